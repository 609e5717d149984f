"""Caffe's data sources read without Caffe (LMDB databases of Datum records)."""
