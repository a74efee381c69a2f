"""``difflab train-autoencoder CONFIG --out AE_RUN`` and ``difflab eval-autoencoder AE_RUN``: the KL autoencoder
of latent diffusion (SPEC §5; :mod:`difflab.objectives.autoencoder`, :mod:`difflab.latent`).

``train-autoencoder`` trains on the engine (``--resume``, the run-directory lock, checkpoints and the divergence
stop as ``difflab train``) with the config's ``autoencoder:`` section and ``train.*``, then encodes the data
once and stores the latents and the scale factor in AE_RUN. ``eval-autoencoder`` measures, on the held-out split
it never trained on: reconstruction MSE and PSNR (pixels in ``[-1, 1]``, peak-to-peak 2), the class accuracy of
the project's classifier (the FD feature network, :mod:`difflab.evaluation.features`) on reconstructions next to
its accuracy on the originals, and FD-<dataset> of reconstructions with its noise floor: the held-out images are
split at random into halves A and B, the value is ``FD(D(E(A)), B)`` and the floor ``FD(A, B)`` (same counts,
disjoint images); and it writes a picture of originals (upper rows) over their reconstructions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Union

import torch

from difflab.commands import arguments

PSNR_PEAK = 2.0
"""The peak-to-peak range of pixels in ``[-1, 1]``: ``PSNR = 10 log10(2² / MSE)``."""
PICTURE_COLUMNS = 16


def train_autoencoder(cfg, out_dir: Union[str, Path], resume: bool = False, overwrite: bool = False,
                      progress: bool = True, device=None, dataset=None):
    """Train the autoencoder ``cfg.autoencoder`` describes on ``cfg.data`` into ``out_dir``; returns the objective
    (its ``final_meta`` holds the scale factor). Raises ``TrainingError``, ``ConfigError``, ``DataError``."""
    from difflab.data import load_dataset
    from difflab.objectives.autoencoder import AutoencoderObjective
    from difflab.training import train_objective

    def build(device):
        d = cfg.data
        data = dataset if dataset is not None else load_dataset(d.name, path=d.path, n=d.n, seed=cfg.train.seed,
                                                                **d.options)
        return AutoencoderObjective(cfg, data, device)

    objective, main = train_objective(cfg, out_dir, build, AutoencoderObjective.artifacts, "autoencoder", resume,
                                      overwrite, progress, device, sample_every=0)
    if progress and main:
        print(f"difflab: scale factor {objective.final_meta['scale_factor']:.5g} (1/std of the latents); "
              f"wrote {out_dir}", flush=True)
    return objective


def evaluate_autoencoder(ae_dir: Union[str, Path], picture: Optional[Union[str, Path]] = None, seed: int = 0,
                         device=None, cache_root=None) -> dict:
    """The held-out measurements of the module docstring, as a dict (and the picture, if asked)."""
    from difflab import metrics
    from difflab.data import load_dataset
    from difflab.evaluation.features import feature_network
    from difflab.latent import load_autoencoder
    from difflab.objectives.classifier import split
    from difflab.plotting import save_image_grid

    ae = load_autoencoder(ae_dir, device=device)
    cfg, d = ae.config, ae.config.data
    ds = load_dataset(d.name, path=d.path, n=d.n, seed=cfg.train.seed, **d.options)
    _, test_idx = split(ds.x.shape[0], cfg.autoencoder.held_out, cfg.train.seed, "autoencoder/split")
    if len(test_idx) < 4:
        raise ValueError(f"{str(ae_dir)!r} kept {len(test_idx)} held-out images (autoencoder.held_out): need >= 4")
    x = ds.x[test_idx]
    x_hat = ae.decode(ae.encode(x))
    mse = float((x_hat - x).double().pow(2).mean())
    result = {"autoencoder": str(ae_dir), "n_held_out": len(test_idx), "mse": mse,
              "psnr_db": 10.0 * math.log10(PSNR_PEAK**2 / mse) if mse > 0 else math.inf,
              "scale_factor": ae.scale_factor, "latent_shape": ae.meta["latent_shape"],
              "image_shape": ae.meta["image_shape"]}
    if ds.y is not None and ds.num_classes >= 2:
        key = d.name if not d.path else f"{d.name}-{Path(d.path).name}"
        net, info = feature_network(key, ds.x, ds.y, ds.num_classes, root=cache_root)
        y = ds.y[test_idx]
        acc_orig = float((net.predict(x) == y).double().mean())
        acc_rec = float((net.predict(x_hat) == y).double().mean())
        half_a, half_b = split(len(test_idx), 0.5, seed, "autoencoder/fd-halves")
        f_rec, f_orig = net.embed(x_hat), net.embed(x)
        result.update(class_accuracy_reconstructions=acc_rec, class_accuracy_originals=acc_orig,
                      class_accuracy_ratio=acc_rec / acc_orig if acc_orig > 0 else math.nan,
                      fd=metrics.frechet_distance(f_rec[half_a], f_orig[half_b]),
                      fd_floor=metrics.frechet_distance(f_orig[half_a], f_orig[half_b]),
                      fd_counts=[len(half_a), len(half_b)], feature_space=f"FD-{key}",
                      feature_net_held_out_accuracy=info.get("held_out_accuracy"))
        result["fd_over_floor"] = result["fd"] / result["fd_floor"] if result["fd_floor"] > 0 else math.inf
    if picture is not None:
        n = min(PICTURE_COLUMNS, len(test_idx))
        save_image_grid(torch.cat([x[:n], x_hat[:n].clamp(-1, 1)]), picture, nrow=n)
        result["picture"] = str(picture)
    return result


# --- the commands ----------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.commands import add_run_arguments

    add_run_arguments(p, "YAML config with data, autoencoder and train sections", "AE_RUN", "autoencoder run",
                      "autoencoder.kl_weight=1e-4 train.steps=500")


def run_train(args: argparse.Namespace) -> int:
    from difflab.commands import run_training

    return run_training(train_autoencoder, args)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ae_dir", metavar="AE_RUN", help="an autoencoder run written by 'difflab train-autoencoder'")
    p.add_argument("--out", metavar="FILE.json", default=None, help="write the result as JSON")
    p.add_argument("--picture", metavar="FILE.png", default=None,
                   help="originals over reconstructions (default: AE_RUN/reconstructions.png)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="seed of the FD halves (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def run_eval(args: argparse.Namespace) -> int:
    picture = Path(args.picture) if args.picture else Path(args.ae_dir) / "reconstructions.png"
    if picture.suffix != ".png" or (args.out and not args.out.endswith(".json")):
        raise ValueError("--picture must end in .png and --out in .json")
    result = evaluate_autoencoder(args.ae_dir, picture, seed=args.seed, device=args.device)
    print(f"difflab eval-autoencoder: {args.ae_dir}, {result['n_held_out']} held-out images "
          f"{tuple(result['image_shape'])} -> latents {tuple(result['latent_shape'])}, "
          f"scale factor {result['scale_factor']:.5g}")
    print(f"  reconstruction MSE {result['mse']:.5f}, PSNR {result['psnr_db']:.2f} dB")
    if "fd" in result:
        print(f"  class accuracy: reconstructions {result['class_accuracy_reconstructions']:.4f}, originals "
              f"{result['class_accuracy_originals']:.4f} (ratio {result['class_accuracy_ratio']:.4f})")
        print(f"  {result['feature_space']} of reconstructions {result['fd']:.4g}, noise floor {result['fd_floor']:.4g} "
              f"({result['fd_over_floor']:.2f}x), halves of {result['fd_counts'][0]}")
    print(f"difflab: wrote {picture}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float))
        print(f"difflab: wrote {args.out}")
    return 0


TRAIN_EXAMPLES = """
examples:
  difflab train-autoencoder configs/ae_mnist5k.yaml --out runs/ae_mnist5k
  difflab train-autoencoder configs/ae_mnist5k.yaml --out runs/ae_mnist5k --resume --set train.steps=4000
  difflab train configs/ldm_mnist5k.yaml --out runs/ldm_mnist5k     # data.autoencoder: runs/ae_mnist5k
"""
EVAL_EXAMPLES = """
examples:
  difflab eval-autoencoder runs/ae_mnist5k
  difflab eval-autoencoder runs/ae_mnist5k --out ae.json --picture ae.png
"""
