"""``brain3d-export``: a trained model as a file that runs without brain3d, or a weights-only checkpoint to share.

* ``format=torchscript``: ``torch.jit.trace`` of the model; load it with ``torch.jit.load`` (torch only).
* ``format=onnx``: ``torch.onnx.export`` (the torch.export-based exporter: needs ``onnx`` and ``onnxscript``,
  ``pip install brain3d[export]``); run it with onnxruntime or any ONNX runtime.
* ``format=weights``: the checkpoint without optimizer, scheduler, scaler, RNG and EMA state (``best.pt`` carries
  AdamW's two moments, so it is three times the weights' size); ``brain3d-predict`` and ``trainer.init_from``
  read it as they read a checkpoint.

The exported model returns LOGITS, as brain3d's heads do: one tensor for a single-task model, a tuple in the order
of the head names for a multi-task one. Next to it, ``<output without suffix>.json`` (:func:`sidecar`) says what
the caller does before (orientation, resampling, cropping, normalisation: the checkpoint's own preprocessing, with
its exact values) and after (sigmoid and threshold, the regression target's scaling, sliding windows for a
patch-trained model); TorchScript and ONNX files carry the same text inside (``_extra_files`` / metadata).

Read top to bottom: check the command line (:func:`config_problem`), rebuild the model as brain3d-predict does
(:func:`load_model`), wrap it with a fixed output order (:class:`ExportedModel`), export, check the exported model
against brain3d's forward on a second random input (another batch size; for segmentation another spatial size too)
and refuse to write a file that differs by more than :data:`TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
import torch.nn as nn
from omegaconf import DictConfig

from brain3d.checkpoint import load_checkpoint, save_checkpoint, write_atomically
from brain3d.cli import config_dir, keys_help, report_user_error, run_command
from brain3d.data.preprocess import validate_settings
from brain3d.errors import ConfigError
from brain3d.models.heads import DIVISOR
from brain3d.models.model import build_model
from brain3d.tasks import MULTITASK, head_configs, task_set_from_checkpoint

log = logging.getLogger("brain3d.export")

FORMATS = ("torchscript", "onnx", "weights")
TOLERANCE = 1e-4  # max |exported - brain3d| on the check input, in logits
ONNX_PACKAGES = ("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) needs both; onnxruntime only checks
# What a weights file keeps of a checkpoint: the weights and everything brain3d-predict / trainer.init_from read
# (config, heads with class names and target scaling), the training split's ids, and where the weights came from.
# Left out: optimizer, scheduler, scaler, rng, train_weights and ema (trainer.ema: "model" already holds the
# averaged weights), and the resume bookkeeping (epoch_progress, batch_size_search, planned_epochs, time_budget).
WEIGHTS_KEYS = ("model", "config", "task", "head_name", "class_names", "target_mean", "target_std",
                "bias_correction", "tasks", "num_parameters", "train_subject_ids", "epoch", "best", "history",
                "init_from")


class ExportError(RuntimeError):
    """The exported model does not compute what brain3d's does (a bug, not a user's mistake: exit status 1)."""


class ExportedModel(nn.Module):
    """A :class:`brain3d.models.model.Brain3DModel` with a fixed output order instead of a dict.

    forward: (B, C, D, H, W) float32 -> the one head's logits (single task), or a tuple of every head's logits
    in ``head_names`` order (multi-task): what tracing and ONNX carry best, and what a caller indexes without
    brain3d. The backbone and heads are the model's own modules (same state-dict keys); Brain3DModel's shape
    checks are left out, as a trace would only record their outcome for the example input.
    """

    def __init__(self, model: nn.Module, head_names: list[str]) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.heads = model.heads
        self.head_names = tuple(head_names)

    def forward(self, x: torch.Tensor):
        features = self.backbone(x)  # [f1 (/2), f2 (/4), f3 (/8), f4 (/16)]
        outputs = tuple(self.heads[name](features) for name in self.head_names)
        return outputs[0] if len(outputs) == 1 else outputs


def config_problem(cfg: DictConfig) -> str | None:
    """What is wrong with the command's settings, as one line (None: nothing), checked before anything is read
    or written: the format, the checkpoint file, the output's folder, the device, the ONNX packages."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        return f"format={fmt} is not one of {', '.join(FORMATS)}"
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    if not checkpoint.is_file():
        return f"checkpoint={cfg.checkpoint}: no such file (a best.pt or last.pt written by brain3d-train)"
    output = Path(str(cfg.output)).expanduser()
    if not output.parent.is_dir():
        return f"output={cfg.output}: the folder {output.parent} does not exist"
    if output.is_dir():
        return f"output={cfg.output} is a folder; name the file to write, e.g. output={output / 'model.pt'}"
    if fmt != "weights" and output.suffix == ".json":
        return f"output={cfg.output}: the .json name is the sidecar's; name the model file, e.g. model.pt"
    if str(cfg.device) not in ("cpu", "cuda"):
        return f"device={cfg.device} is not one of cpu, cuda"
    if str(cfg.device) == "cuda" and not torch.cuda.is_available():
        return "device=cuda but torch sees no CUDA GPU"
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            return f"format=onnx needs {' and '.join(missing)} (not installed): pip install brain3d[export]"
    return None


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The checkpoint's model (as brain3d-predict rebuilds it: its ``model`` weights, which are the averaged ones
    under trainer.ema), in eval mode, float32, on ``device``; and the checkpoint dict."""
    state = load_checkpoint(path, map_location="cpu")
    config = state["config"]
    model = build_model(config["backbone"], head_configs(config["task"]))
    model.load_state_dict(state["model"])
    return model.float().to(device).eval(), state


def input_shape(config: dict) -> list[int]:
    """(1, C, D, H, W) of the example input: C = backbone.in_channels, (D, H, W) = data.patch_size for a
    patch-trained model, else data.shape (what preprocessing makes), else preprocess.shape.

    Raises:
        ConfigError: the checkpoint's config names no spatial shape.
    """
    data = config.get("data") or {}
    spatial = data.get("patch_size") or data.get("shape") or (config.get("preprocess") or {}).get("shape")
    if not spatial:
        raise ConfigError("the checkpoint's config has no data.shape, data.patch_size or preprocess.shape: "
                          "the input shape to export for is unknown")
    if isinstance(spatial, int):
        spatial = [spatial] * 3
    return [1, int(config["backbone"].get("in_channels", 1)), *(int(s) for s in spatial)]


def check_input_shape(shape: list[int], has_segmentation: bool) -> list[int]:
    """A second, different input shape to check the export on: batch 2 (the batch axis is not fixed) and, for a
    model with a segmentation head, one more block of 16 voxels on the first spatial axis (any size divisible by
    16 works, not only the example's)."""
    check = [2, *shape[1:]]
    if has_segmentation:
        check[2] += DIVISOR
    return check


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def max_difference(expected, actual) -> float:
    """The largest absolute difference over every output (the shapes must agree)."""
    expected, actual = as_tuple(expected), as_tuple(actual)
    if len(expected) != len(actual):
        raise ExportError(f"the exported model returns {len(actual)} outputs, brain3d's {len(expected)}")
    worst = 0.0
    for e, a in zip(expected, actual):
        a = torch.as_tensor(a)
        if tuple(e.shape) != tuple(a.shape):
            raise ExportError(f"the exported model returns shape {tuple(a.shape)}, brain3d's {tuple(e.shape)}")
        worst = max(worst, float((e.detach().cpu().float() - a.detach().cpu().float()).abs().max()))
    return worst


def check_outputs(what: str, expected, actual, shape: list[int]) -> float:
    """Raise :class:`ExportError` when the exported model differs from brain3d's by more than TOLERANCE."""
    difference = max_difference(expected, actual)
    if not difference <= TOLERANCE:
        raise ExportError(f"the {what} model differs from brain3d's forward by {difference:.3g} (> {TOLERANCE}) on a "
                          f"random input of shape {tuple(shape)}; nothing was written")
    log.info("checked: the %s model matches brain3d's forward to %.2g on a random input of shape %s", what,
             difference, tuple(shape))
    return difference


def export_torchscript(module: ExportedModel, example: torch.Tensor, check: torch.Tensor, path: Path,
                       metadata: str) -> float:
    """Trace ``module`` on ``example``, check it on ``check``, save it (with ``brain3d.json`` inside)."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks torch.jit deprecated (for torch.export); TorchScript is still what runs with torch alone
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        difference = check_outputs("TorchScript", module(check), traced(check), list(check.shape))
        write_atomically(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files={"brain3d.json": metadata}),
                         readable_by_others=True)
    return difference


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers' levels for a while: the ONNX exporter and its optimiser log dozens of INFO lines
    ("Removed 174 unused nodes") and a warning per torchvision operator when torchvision is absent."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)


def export_onnx(module: ExportedModel, example: torch.Tensor, check: torch.Tensor, path: Path, metadata: str,
                dynamic_spatial: bool) -> float | None:
    """``torch.onnx.export`` (torch.export-based) with a dynamic batch axis (and, with a segmentation head, spatial
    axes of any multiple of 16), the JSON in the model's metadata; checked with onnxruntime when it is installed
    (None: not checked)."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    axes = {0: batch}
    if dynamic_spatial:
        axes.update({axis: DIVISOR * torch.export.Dim(f"{name}_blocks", min=1, max=256)
                     for axis, name in ((2, "depth"), (3, "height"), (4, "width"))})

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings(), quiet_loggers(("torch.onnx", "onnxscript", "onnx_ir")):
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations, nothing of ours
            torch.onnx.export(module, (example,), tmp, dynamo=True, external_data=False, verbose=False,
                              input_names=["image"], output_names=list(module.head_names),
                              dynamic_shapes={"x": axes})
        model = onnx.load(tmp)
        onnx.helper.set_model_props(model, {"brain3d.json": metadata})
        onnx.save(model, tmp)
        if importlib.util.find_spec("onnxruntime") is None:
            return
        import onnxruntime

        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = module(check)
        nonlocal difference
        difference = check_outputs("ONNX", expected, session.run(None, {"image": check.cpu().numpy()}),
                                   list(check.shape))

    difference = None
    write_atomically(path, write, readable_by_others=True)
    if difference is None:
        log.warning("onnxruntime is not installed: %s was not run after export (pip install brain3d[export])", path)
    return difference


def weights_state(state: dict, keep_subject_ids: bool) -> dict:
    """A checkpoint dict reduced to :data:`WEIGHTS_KEYS` (``train_subject_ids`` None when not kept)."""
    weights = {key: state[key] for key in WEIGHTS_KEYS if key in state}
    weights["weights_only"] = True  # no optimizer state: for prediction and trainer.init_from, not trainer.resume
    if not keep_subject_ids:
        weights["train_subject_ids"] = None  # predict then says the split is unknown, not "none of these"
    return weights


def preprocessing_steps(settings: dict, channels: list[str]) -> list[str]:
    """The preprocessing of :func:`brain3d.data.preprocess.preprocess_volume` with these settings, in words."""
    steps = ["read the NIfTI image (scl_slope / scl_inter applied) as float32 and reorient it to the closest "
             "canonical RAS orientation (nibabel.as_closest_canonical); its array axes (X, Y, Z) are the model's "
             "(D, H, W)"]
    if settings["mode"] == "resize":
        steps.append(f"resample the whole volume to {settings['shape']} voxels (trilinear, align_corners=False: "
                     "torch.nn.functional.interpolate); the field of view is kept, the voxel size changes")
    else:
        if settings["spacing"] is None:
            steps.append("keep the native voxel size (no resampling)")
        else:
            steps.append(f"resample to a voxel size of {settings['spacing']} mm (RAS order): shape "
                         "round(shape * voxel_size / spacing) per axis, trilinear, align_corners=False")
        if settings["crop_foreground"]:
            steps.append(f"crop to the bounding box of the nonzero voxels plus {settings['foreground_margin']} "
                         "voxels on each side (clipped to the volume)")
        if settings["shape"] is not None:
            steps.append(f"centre crop / zero-pad to {settings['shape']} (an excess of e voxels removes e // 2 at "
                         "the start; a shortfall of s adds s // 2 zeros before), centred on the foreground box "
                         "when cropped to it")
    if settings["normalization"] == "zscore":
        steps.append("z-score with the mean and std of the nonzero voxels; zero voxels stay 0")
    elif settings["normalization"] == "percentile":
        lo, hi = settings["percentiles"]
        steps.append(f"percentile scaling of the nonzero voxels: lo, hi = their {lo} and {hi} percentiles, "
                     "v -> (clip(v, lo, hi) - lo) / (hi - lo); zero voxels stay 0")
    if len(channels) == 1:
        steps.append("add the batch and channel axes: (1, 1, D, H, W) float32")
    else:
        steps.append(f"the same for each of the {len(channels)} channels {channels}, each brought onto the first "
                     "one's grid first (brain3d.data.channels); stack them in that order: (1, C, D, H, W) float32")
    return steps


def channel_columns(data: dict) -> list[str]:
    """The manifest column of each input channel, in channel order: ``data.image_col`` (a name, or a list for
    several channels), as brain3d.data.channels reads it where that module exists."""
    try:
        from brain3d.data.channels import image_columns
    except ImportError:  # a brain3d of one input channel
        return [str(data.get("image_col") or "image")]
    return image_columns(data)


def head_entry(task, threshold: float) -> dict:
    """One output of the exported model: its head, what it returns and what to apply to it."""
    entry = {"name": task.name, "kind": task.kind, "column": task.column}
    if task.kind == "classification":
        names = task.class_names or ["0", "1"]
        entry.update(shape="(B, 1)", returns="logit", class_names=names, positive_class=names[1],
                     threshold=threshold,
                     apply=f"probability of {names[1]!r} = sigmoid(logit); predicted class = class_names[1] when "
                           f"probability > {threshold}, else class_names[0]")
    elif task.kind == "regression":
        entry.update(shape="(B, 1)", returns="standardised value", target_mean=task.target_mean,
                     target_std=task.target_std, unit=f"that of the training column {task.column!r}",
                     apply=f"value = output * {task.target_std} + {task.target_mean} (target_std, target_mean)",
                     bias_correction=task.bias_correction)
        if task.bias_correction:
            entry["bias_correction_apply"] = ("optional brain-age bias correction: corrected = (value - intercept) "
                                              "/ slope")
    else:  # segmentation: one logit per voxel (binary), or K labels plus the background (K+1 logits)
        small, k = task.min_lesion_voxels, task.num_classes
        if k > 1:
            entry.update(shape=f"(B, {k + 1}, D, H, W)", returns="voxel logits, channel 0 the background",
                         num_classes=k, label_names=list(task.label_names),
                         apply=f"probabilities = softmax(logits) over the {k + 1} channels; label map = argmax (0 "
                               f"background, 1..{k} = label_names)")
            removal = f"every label's 26-connected components of fewer than {small} voxels become background"
        else:
            entry.update(shape="(B, 1, D, H, W)", returns="voxel logits", threshold=threshold,
                         apply=f"probability = sigmoid(logit) per voxel; mask = probability > {threshold}")
            removal = f"drop the mask's 26-connected components of fewer than {small} voxels"
        entry["min_lesion_voxels"] = small
        if small > 1:
            entry["apply"] += f"; then {removal}"
    return entry


def sidecar(state: dict, fmt: str, output: Path, checkpoint: str, shape: list[int], threshold: float,
            device: str) -> dict:
    """What a caller without brain3d must know: input, preprocessing, outputs and what to apply to them."""
    config = state["config"]
    data = config.get("data") or {}
    tasks = task_set_from_checkpoint(state)
    settings = validate_settings(config.get("preprocess") or {"mode": "resize", "shape": list(data["shape"])})
    patch_size = data.get("patch_size")
    segmentation = tasks.mask_task is not None
    if segmentation:
        spatial = f"any D, H, W divisible by {DIVISOR} (the network downsamples 4 times by 2)"
        pooled = [task.name for task in tasks if not task.reads_mask]
        if patch_size:
            spatial += f"; trained on patches of {list(patch_size)}: whole volumes by sliding windows (sliding_window)"
        elif pooled:
            spatial += f"; the heads {', '.join(pooled)} were trained on {shape[2:]}, the size preprocessing makes"
    else:
        spatial = f"{shape[2:]}, the size preprocessing makes (the size trained on)"
    outputs = [head_entry(task, threshold) for task in tasks]
    channels = channel_columns(data)
    sliding = None
    if patch_size and segmentation:
        overlap = float((config.get("trainer") or {}).get("sw_overlap", 0.5))  # as validation ran
        sliding = {"patch_size": list(patch_size), "overlap": overlap, "weighting": "gaussian (sigma 0.125 x patch)",
                   "average": "probabilities (sigmoid, or softmax for several labels, before averaging)",
                   "why": "trained on patches: brain3d-predict runs whole volumes by Gaussian-weighted sliding "
                          "windows of the patch size (the volume zero-padded to at least one patch)"}
    flip_axes = list((config.get("trainer") or {}).get("val_flip_axes") or [])
    flips = None
    if flip_axes:  # trainer.val_flip_axes: how validation measured the model and brain3d-predict runs it
        flips = {"axes": flip_axes, "average": "probabilities (sigmoid / softmax first); regression: the values",
                 "how": "also run the input flipped along every combination of these array axes (D, H, W = 0, 1, "
                        "2; 0 is left-right), flip voxel-wise outputs back, and average: the model was validated "
                        "so, and brain3d-predict does it by default"}
    returns = ("one tensor: the logits of head " + repr(tasks.names[0]) if len(outputs) == 1
               else "a tuple of tensors, one per head in the order " + ", ".join(tasks.names))
    usage = {
        "torchscript": "model = torch.jit.load(path).eval(); with torch.no_grad(): out = model(x)",
        "onnx": "session = onnxruntime.InferenceSession(path); out = session.run(None, {'image': x.numpy()})",
    }.get(fmt, "")
    return {
        "brain3d_version": importlib.metadata.version("brain3d"),
        "format": fmt,
        "file": output.name,
        "checkpoint": str(checkpoint),
        "epoch": state.get("epoch"),
        "task": MULTITASK if tasks.multi else state["task"],
        "device": device,
        "input": {"name": "image", "shape": shape, "dtype": "float32",
                  "layout": "(B, C, D, H, W); D, H, W = the RAS array axes X (left->right), Y (posterior->"
                            "anterior), Z (inferior->superior)",
                  "batch": "any batch size", "spatial": spatial,
                  "channels": channels},
        "preprocessing": {**settings, "orientation": "RAS", "steps": preprocessing_steps(settings, channels)},
        "output_order": tasks.names,
        "returns": returns,
        "outputs": outputs,
        "sliding_window": sliding,
        "flip_averaging": flips,
        "postprocessing": "predictions are on the preprocessed grid; brain3d-predict maps a mask back to the input "
                          "file's grid by undoing the crop / pad, resampling (trilinear) and reorienting",
        "usage": (f"{usage}, with x the preprocessed image as a (B, C, D, H, W) float32 tensor (steps in "
                  "'preprocessing'); then apply each output's 'apply'. The exported model returns logits."),
    }


def export(cfg: DictConfig) -> dict:
    """Export as ``cfg`` says; return ``{"output", "json" (None for weights), "bytes", "checkpoint_bytes",
    "max_difference"}``.

    Raises:
        ConfigError: a setting that cannot work (:func:`config_problem`).
        FileNotFoundError, ValueError: the checkpoint cannot be read.
        ExportError: the exported model does not match brain3d's forward.
    """
    problem = config_problem(cfg)
    if problem:
        raise ConfigError(problem)
    fmt, output = str(cfg.format), Path(str(cfg.output)).expanduser()
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    device = torch.device(str(cfg.device))
    model, state = load_model(checkpoint, device)
    result = {"output": str(output), "json": None, "checkpoint_bytes": checkpoint.stat().st_size,
              "max_difference": None}
    if fmt == "weights":
        save_checkpoint(weights_state(state, bool(cfg.get("keep_subject_ids", True))), output, readable_by_others=True)
    else:
        shape = input_shape(state["config"])
        tasks = task_set_from_checkpoint(state)
        segmentation = tasks.mask_task is not None
        module = ExportedModel(model, tasks.names).eval()
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(shape, generator=generator).to(device)
        check = torch.randn(check_input_shape(shape, segmentation), generator=generator).to(device)
        info = sidecar(state, fmt, output, str(checkpoint), shape, float(cfg.threshold), str(cfg.device))
        metadata = json.dumps(info, indent=2)
        if fmt == "torchscript":
            result["max_difference"] = export_torchscript(module, example, check, output, metadata)
        else:
            result["max_difference"] = export_onnx(module, example, check, output, metadata, segmentation)
        json_path = output.with_suffix(".json")
        write_atomically(json_path, lambda tmp: Path(tmp).write_text(metadata + "\n"), readable_by_others=True)
        result["json"] = str(json_path)
    result["bytes"] = output.stat().st_size
    log.info("wrote %s (%s, %.2f MB; the checkpoint %s is %.2f MB)%s", output, fmt, result["bytes"] / 1e6,
             checkpoint, result["checkpoint_bytes"] / 1e6, f" and {result['json']}" if result["json"] else "")
    return result


USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)

HELP = f"""brain3d-export: a brain3d-train checkpoint as a model that runs without brain3d, or a weights-only file.

format=torchscript (torch.jit.load, torch only) or format=onnx (pip install brain3d[export]) writes the model and,
next to it, <output without suffix>.json: the input shape and channel, the preprocessing with the checkpoint's
exact values, the output order and what to apply to the logits (sigmoid, threshold, class names, the regression
target's mean and std, sliding windows for a patch-trained model). The export is checked against brain3d's own
forward on a random input (to {TOLERANCE}) before anything is written. format=weights writes the checkpoint without
optimizer, scheduler and EMA state (a third of best.pt's size); brain3d-predict and trainer.init_from read it.

Reads:
{keys_help("export")}

Examples:
  brain3d-export checkpoint=outputs/classification/2026-12-01/10-00-00/checkpoints/best.pt output=sex.pt
  brain3d-export checkpoint=age/checkpoints/best.pt format=onnx output=age.onnx
  brain3d-export checkpoint=lesion/checkpoints/best.pt format=torchscript output=exported/lesion.pt threshold=0.4
  brain3d-export checkpoint=run/checkpoints/best.pt format=weights output=run_weights.pt
  brain3d-export checkpoint=run/checkpoints/best.pt format=weights output=share.pt keep_subject_ids=false

Writes: the model file (output) and, for torchscript and onnx, the .json next to it.
Exit status: 0 done, 1 the exported model did not match brain3d's (nothing written), 2 a mistake in the command."""

REQUIRED = {"checkpoint": "checkpoint=PATH (a best.pt or last.pt written by brain3d-train)",
            "output": "output=FILE (the model file to write, e.g. model.pt or model.onnx)"}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except USER_ERRORS as err:
        report_user_error("brain3d-export", err)
        sys.exit(2)
    except ExportError as err:
        report_user_error("brain3d-export", err)
        sys.exit(1)


def main() -> None:
    """``brain3d-export``: --help, the command-line check (brain3d.cli, with :func:`config_problem`), then Hydra."""
    run_command(hydra_main, "brain3d-export", "export", HELP, required=REQUIRED, validate=config_problem)


if __name__ == "__main__":
    main()
