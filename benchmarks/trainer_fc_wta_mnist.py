"""FC-WTA on MNIST (2000 ReLU units, 5% lifetime sparsity) trained by `caffeonnx train`, then a linear
classifier on its dense codes: test error and time taken.  Writes benchmarks/results/trainer_fc_wta_mnist.json.

The autoencoder is 784-2000-784 (ReLU code, linear decoder tied to the encoder's weight, squared error),
trained with Caffe's SGD
(momentum 0.9) on the 60,000 training images; the classifier is a linear SVM on the dense codes
(no sparsity at test time, as in the paper) of the training images, evaluated on the 10,000 test images.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caffeonnx.runtime.inputs import open_samples
from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.session import TrainOptions, run_training

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist"

NET = """name: "fc_wta"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 100 dim: 1 dim: 28 dim: 28 } }
  transform_param { scale: 0.00390625 } }
layer { name: "encode" type: "InnerProduct" bottom: "data" top: "code" {enc_param}
  inner_product_param { num_output: 2000 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "encode_relu" type: "ReLU" bottom: "code" top: "code" }
layer { name: "decode" type: "InnerProduct" bottom: "code" top: "recon" {dec_param}
  inner_product_param { num_output: 784 {dec_transpose} weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" }
layer { name: "loss" type: "EuclideanLoss" bottom: "recon" bottom: "flat" top: "loss" }
"""

SOLVER = """net: "{net}"
type: "SGD"
base_lr: {lr}
momentum: 0.9
lr_policy: "step"
gamma: 0.1
stepsize: {stepsize}
max_iter: {max_iter}
display: 600
snapshot_after_train: false
random_seed: 1
"""


def load(name: str) -> np.ndarray:
    with open_samples(MNIST / name, scratch_dir=tempfile.gettempdir()) as arr:
        return np.array(arr)


def codes(module: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """Dense (inference-mode) codes of `images`, in batches."""
    module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            x = torch.from_numpy(images[i:i + 1000].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
            out.append(module({"data": x}, ["code"])["code"])
    return torch.cat(out)


def linear_svm(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Linear:
    """A multi-class linear SVM (squared hinge, as the paper's linear SVM) trained by SGD with momentum."""
    torch.manual_seed(seed)
    clf = torch.nn.Linear(train_x.shape[1], 10)
    opt = torch.optim.SGD(clf.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(train_x) // 100))
    for _ in range(epochs):
        perm = torch.randperm(len(train_x))
        for i in range(0, len(train_x), 100):
            idx = perm[i:i + 100]
            loss = torch.nn.functional.multi_margin_loss(clf(train_x[idx]), train_y[idx], p=2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=60, help="autoencoder epochs of 600 iterations")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--clf-epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "trainer_fc_wta_mnist.json")
    ap.add_argument("--untied", dest="tied", action="store_false",
                    help="a decoder weight of its own (default: the encoder's weight, transposed, one shared blob)")
    ap.add_argument("--keep", type=Path, default=ROOT / "work" / "fc_wta", help="PREFIX for the trained .caffemodel/.onnx")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tie = 'param { name: "W" } param { }'
        (work / "net.prototxt").write_text(
            NET.replace("{enc_param}", tie if args.tied else "").replace("{dec_param}", tie if args.tied else "")
            .replace("{dec_transpose}", "transpose: true" if args.tied else ""))
        iters = args.epochs * 600
        (work / "solver.prototxt").write_text(SOLVER.format(net=work / "net.prototxt", lr=args.lr, max_iter=iters,
                                                            stepsize=int(iters * 0.8)))
        t0 = time.perf_counter()
        result = run_training(TrainOptions(work / "solver.prototxt", data=str(MNIST / "train-images-idx3-ubyte.gz"),
                                           output=args.keep, wta=["encode_relu=5%"], device="auto"),
                              say=lambda line: print(line, flush=True))
        train_s = time.perf_counter() - t0
        param = load_solver(work / "solver.prototxt")
        module = build_module(train_net(param, work / "solver.prototxt"), read_weights(f"{args.keep}.caffemodel"), 0)
    t1 = time.perf_counter()
    train_codes, test_codes = codes(module, load("train-images-idx3-ubyte.gz")), codes(module, load("t10k-images-idx3-ubyte.gz"))
    active = float((test_codes > 0).float().mean())
    scale = train_codes.max()  # one factor for all units keeps the sparse codes' geometry
    train_codes, test_codes = train_codes / scale, test_codes / scale
    train_y = torch.from_numpy(load("train-labels-idx1-ubyte.gz").astype(np.int64))
    test_y = torch.from_numpy(load("t10k-labels-idx1-ubyte.gz").astype(np.int64))
    clf = linear_svm(train_codes, train_y, args.clf_epochs, seed=0)
    with torch.no_grad():
        error = float((clf(test_codes).argmax(1) != test_y).float().mean())
    clf_s = time.perf_counter() - t1
    out = {
        "autoencoder": f"784-2000-784, ReLU code, linear decoder{' tied to the encoder' if args.tied else ''}, "
                       "EuclideanLoss; FC-WTA 5% lifetime sparsity",
        "solver": f"SGD lr {args.lr} momentum 0.9, step x0.1 at 80%, batch 100, {args.epochs} epochs ({iters} iterations)",
        "classifier": f"linear SVM (multi-class squared hinge) on the dense codes / their max, {args.clf_epochs} epochs",
        "test_error": error,
        "paper_test_error": 0.012,
        "final_train_loss": result.iterations[-1].loss,
        "train_seconds": train_s,
        "train_samples_per_s": result.samples / result.seconds,
        "classifier_seconds": clf_s,
        "fraction_of_active_test_code_units": active,
        "machine": f"{platform.machine()} python {platform.python_version()} torch {torch.__version__} "
                   f"threads {torch.get_num_threads()} device {'cuda' if torch.cuda.is_available() else 'cpu'}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
