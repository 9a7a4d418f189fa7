"""How far a reading can be trusted, on real radiographs: applicability gate, member spread, flip TTA.

Needs a k-fold classifier run on a cache of real chest radiographs (the 600 shared RSNA images),
the bundle built from it (``lungopacity bundle``), and scikit-image / scikit-learn for the
non-chest images; run from the repository root:

    python benchmarks/bench_reading.py --run RUN --bundle MODEL [--dicoms ../shared/data/rsna-dicom]
        [--out reading_figures.json]

Every score is held-out: a patient of fold ``k`` is scored only by member ``k`` (the fold model
that did not train on it) and member ``k``'s feature model, fitted on the images of the other
folds. What is measured:

1. **Applicability, non-chest**: AUROC of the feature distance between the real held-out
   radiographs and the 2-D images that ship with scikit-image (photographs, textures, microscopy,
   a retina, a CT phantom, ...) and scikit-learn's two sample photographs, all read through the
   package's own reader (PNG, luminance) like a user's upload. Pooled over the 5 members (each
   non-chest image is scored by each member).
2. **Applicability, transformed radiographs**: the same AUROC against each member's held-out
   radiographs rotated by 90 and 180 degrees, inverted (255 - x), and cropped (the central half
   of each side, scaled back up), separately.
3. Rejection rates at the deployed rule (``distance / threshold > 1``): real held-out images
   with the threshold set on the other half of the fold (no leak), non-chest and transformed
   images with the bundle's thresholds.
4. **Flip test-time augmentation**: out-of-fold opacity AUC of member ``k`` on fold ``k`` with and
   without averaging the probabilities of the image and its mirror.
5. **Uncertainty vs error**: the out-of-fold reading (``oof.csv``, the bundle's temperature and
   threshold) of each patient has one member only, so the member spread is measured two ways:
   (a) *snapshot spread*: the same fold model's held-out predictions after each epoch
   (``fold_k/epoch_logits.npz``, written by the accuracy experiments' runs), all out-of-fold;
   (b) *all five fold models* (the deployed ensemble), of which four trained on the patient: an
   optimistic, label-leaking measure, given for comparison only. For each: error rate of the
   flagged (members on both sides of the threshold) vs the rest, and of the most uncertain tenth
   (largest std) vs the rest. Plus the deployed ensemble on the real DICOMs none of the models saw.

Timings are not measured (accuracy figures only).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lungopacity.constants import LUNG_OPACITY
from lungopacity.data.cache import PreparedCache
from lungopacity.data.preprocess import decode_prepared, network_input
from lungopacity.inference import Predictor
from lungopacity.inference.applicability import member_outputs
from lungopacity.metrics.classification import roc_auc, softmax

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DICOMS = REPO.parent / "shared" / "data" / "rsna-dicom"


def non_chest_images(size: int) -> dict[str, np.ndarray]:
    """Prepared uint8 images of every 2-D image shipped with scikit-image and scikit-learn."""
    import skimage.data as data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    arrays: dict[str, np.ndarray] = {}
    for name in data.__all__:
        if name in ("download_all", "data_dir", "file_hash", "lbp_frontal_face_cascade_filename"):
            continue
        try:
            value = getattr(data, name)()
        except Exception:  # noqa: BLE001 - needs a download (pooch) or 3-D: not shipped as a 2-D image
            continue
        value = np.asarray(value[0] if isinstance(value, tuple) else value)
        if name == "lfw_subset":
            for i in range(5):
                arrays[f"lfw_face_{i}"] = value[i]
            continue
        if value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4)):
            arrays[name] = value
    for i, image in enumerate(load_sample_images().images):
        arrays[f"sklearn_sample_{i}"] = image
    prepared = {}
    for name, value in arrays.items():
        if value.dtype == bool:
            value = value.astype(np.uint8) * 255
        elif value.dtype != np.uint8:
            value = np.clip((value - value.min()) / max(float(np.ptp(value)), 1e-9) * 255, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(value).save(buffer, format="PNG")  # as a user would upload it
        prepared[name], _ = decode_prepared(buffer.getvalue(), size, name=f"{name}.png")
    return prepared


TRANSFORMS = {
    "rotated 90": lambda x: np.ascontiguousarray(np.rot90(x, 1)),
    "rotated 180": lambda x: np.ascontiguousarray(np.rot90(x, 2)),
    "inverted": lambda x: 255 - x,
    "cropped (central half)": None,  # below: needs a resize
}


def _crop(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    s = image.shape[0]
    centre = image[s // 4 : s - s // 4, s // 4 : s - s // 4]
    return np.asarray(Image.fromarray(centre).resize((s, s), Image.Resampling.BILINEAR))


def outputs(member: torch.nn.Module, images: np.ndarray, input_size: int, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    logits, features = [], []
    for start in range(0, len(images), batch):
        x = network_input(images[start : start + batch], size=input_size)
        z, f = member_outputs([member], x)
        logits.append(z[0])
        features.append(f[0])
    return np.concatenate(logits), np.concatenate(features)


def wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    z, p = 1.959964, k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def error_split(errors: np.ndarray, flagged: np.ndarray) -> dict[str, object]:
    def part(mask: np.ndarray) -> dict[str, object]:
        k, n = int(errors[mask].sum()), int(mask.sum())
        return {"n": n, "errors": k, "error_rate": round(k / n, 4) if n else None, "ci95": wilson(k, n)}

    return {"flagged": part(flagged), "rest": part(~flagged)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the k-fold classifier run")
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle built from it")
    parser.add_argument("--cache", type=Path, default=None, help="default: the run's cache")
    parser.add_argument("--dicoms", type=Path, default=DEFAULT_DICOMS, help="real DICOMs no model saw")
    parser.add_argument("--out", type=Path, default=Path("reading_figures.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = json.loads((args.run / "config.json").read_text())
    cache = PreparedCache(args.cache or config["cache"]["path"])
    predictor = Predictor.from_bundle(args.bundle)
    members, gate = predictor.classifiers, predictor.gate
    temperature, threshold = predictor.temperature, predictor.threshold
    input_size = predictor.input_size
    positions = cache.indices()
    table = cache.table.iloc[positions].reset_index(drop=True)
    images = np.stack([cache.image(int(i)) for i in positions])
    ids = table["patientId"].astype(str).to_numpy()
    target = table["Target"].to_numpy(dtype=int)
    fold_of = np.full(len(ids), -1)
    for k in range(len(members)):
        held = set(pd.read_csv(args.run / f"fold_{k}" / "val_predictions.csv", dtype={"patientId": str})["patientId"])
        fold_of[np.isin(ids, list(held))] = k
    outside = non_chest_images(cache.size)
    names = list(outside)
    outside_images = np.stack([outside[n] for n in names])
    print(f"{len(ids)} real radiographs in {len(members)} folds; {len(names)} non-chest images: {', '.join(names)}")

    real_score, real_fold, plain_p, flip_p = [], [], [], []
    all_member_p = np.zeros((len(members), len(ids)))
    outside_scores = np.zeros((len(members), len(names)))
    transformed: dict[str, list[np.ndarray]] = {name: [] for name in TRANSFORMS}
    for k, member in enumerate(members):
        model, member_threshold = gate.feature_models[k], gate.thresholds[k]
        logits, features = outputs(member, images, input_size)
        all_member_p[k] = softmax(logits, temperature)[:, LUNG_OPACITY]
        held = np.flatnonzero(fold_of == k)
        real_score.append(model.distance(features[held]) / member_threshold)
        real_fold.append(held)
        plain_p.append(softmax(logits[held])[:, LUNG_OPACITY])
        flipped_logits, _ = outputs(member, np.ascontiguousarray(images[held][:, :, ::-1]), input_size)
        flip_p.append((plain_p[-1] + softmax(flipped_logits)[:, LUNG_OPACITY]) / 2)
        _, f = outputs(member, outside_images, input_size)
        outside_scores[k] = model.distance(f) / member_threshold
        for name, transform in TRANSFORMS.items():
            changed = np.stack([(transform or _crop)(img) for img in images[held]])
            _, f = outputs(member, changed, input_size)
            transformed[name].append(model.distance(f) / member_threshold)
        print(f"member {k}: {len(held)} held-out images scored")

    real = np.concatenate(real_score)
    order = np.concatenate(real_fold)

    def auroc(ood: np.ndarray) -> float:
        labels = np.r_[np.zeros(real.size), np.ones(ood.size)]
        return round(roc_auc(labels, np.r_[real, ood]), 4)

    # Rejection of real held-out images with a threshold from the other half of the fold (no leak).
    rng = np.random.default_rng(0)
    rejected = []
    for scores in real_score:
        half = rng.permutation(len(scores)) < len(scores) // 2
        for a, b in ((half, ~half), (~half, half)):
            rejected.append(scores[b] > np.percentile(scores[a], gate.part.percentile))
    deployed_outside = outside_scores.mean(axis=0)
    figures: dict[str, object] = {
        "n_real": int(real.size), "n_non_chest": len(names), "non_chest_images": names,
        "percentile": gate.part.percentile,
        "applicability": {
            "non_chest": {"auroc": auroc(outside_scores.ravel()),
                          "rejected_at_deployed_rule": f"{int((deployed_outside > 1).sum())}/{len(names)}",
                          "not_rejected": [n for n, s in zip(names, deployed_outside) if s <= 1]},
            **{name: {"auroc": auroc(np.concatenate(scores)),
                      "rejected_at_deployed_rule": round(float(np.mean(np.concatenate(scores) > 1)), 4)}
               for name, scores in transformed.items()},
            "real_held_out_rejected_threshold_from_other_half": round(float(np.mean(np.concatenate(rejected))), 4),
        },
    }

    plain, flipped = np.concatenate(plain_p), np.concatenate(flip_p)
    figures["flip_tta"] = {"oof_auc_plain": round(roc_auc(target[order], plain), 4),
                           "oof_auc_flip_averaged": round(roc_auc(target[order], flipped), 4)}

    oof = pd.read_csv(args.run / "oof.csv", dtype={"patientId": str}).set_index("patientId").reindex(ids)
    oof_logits = oof[["logit_normal", "logit_not_normal", "logit_lung_opacity"]].to_numpy()
    reading = softmax(oof_logits, temperature)[:, LUNG_OPACITY]
    errors = (reading >= threshold).astype(int) != target
    uncertainty: dict[str, object] = {"n": int(len(ids)), "errors": int(errors.sum()), "threshold": threshold}
    snapshots = []
    for k in range(len(members)):
        path = args.run / f"fold_{k}" / "epoch_logits.npz"
        if not path.exists():
            break
        saved = np.load(path)
        epochs = sorted(key for key in saved.files if key.endswith("_plain"))
        row_ids = cache.table["patientId"].astype(str).to_numpy()[saved["positions"]]
        at = pd.Series(np.arange(len(ids)), index=ids).reindex(row_ids).to_numpy()
        snapshots.append((at, np.stack([softmax(saved[e], temperature)[:, LUNG_OPACITY] for e in epochs])))
    if len(snapshots) == len(members):
        spread = np.zeros((snapshots[0][1].shape[0], len(ids)))
        for at, p in snapshots:
            spread[:, at] = p
        uncertainty["snapshot_spread"] = _uncertainty(spread, errors, threshold)
        uncertainty["snapshot_spread"]["members"] = f"{spread.shape[0]} epoch snapshots of the out-of-fold model"
    uncertainty["all_fold_models_leaky"] = _uncertainty(all_member_p, errors, threshold)
    figures["uncertainty"] = uncertainty

    if (args.dicoms / "stage_2_train_labels.csv").exists():
        labels = pd.read_csv(args.dicoms / "stage_2_train_labels.csv").groupby("patientId")["Target"].max()
        files = sorted((args.dicoms / "stage_2_train_images").glob("*.dcm"))
        readings = [predictor.read(f.read_bytes(), f.name, with_images=False).prediction for f in files]
        truth = np.array([labels[f.stem] for f in files])
        decided = np.array([r.decision is not None for r in readings])
        wrong = np.array([r.decision is not None and int(r.decision) != t for r, t in zip(readings, truth)])
        flagged = np.array([r.uncertain for r in readings])
        figures["unseen_dicoms"] = {
            "n": len(files), "decided": int(decided.sum()), "errors": int(wrong.sum()),
            "flagged_uncertain": int(flagged.sum()), "errors_among_flagged": int((wrong & flagged).sum()),
            "auc_final": round(roc_auc(truth, [r.opacity_probability for r in readings]), 4),
            "member_std_median": round(float(np.median([r.member_std for r in readings])), 4),
        }
    figures["calibration"] = {k: predictor.model_card["calibration"][k]
                              for k in ("quantity", "temperature", "n", "ece_before", "ece_after", "ece_after_cross_fitted")}
    figures["decision"] = predictor.model_card["decision"]["reason"]
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


def _uncertainty(member_p: np.ndarray, errors: np.ndarray, threshold: float) -> dict[str, object]:
    std = member_p.std(axis=0)
    flagged = (member_p.min(axis=0) < threshold) & (threshold <= member_p.max(axis=0))
    top = std >= np.quantile(std, 0.9)
    return {"flagged_both_sides": error_split(errors, flagged), "top_tenth_std": error_split(errors, top),
            "auc_std_for_error": round(roc_auc(errors.astype(int), std), 4)}


if __name__ == "__main__":
    main()
