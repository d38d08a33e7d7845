"""Device, precision and speed defaults: trainer.precision=auto on CPUs with and without native bf16,
channels_last, fused AdamW on CUDA, the bf16 convolution guard."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from brain3d import hardware
from brain3d.errors import ConfigError
from brain3d.train import build_optimizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags_line, expected", [
    ("flags\t\t: fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_vnni", ("avx512_bf16",)),  # AMD Zen 4/5
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile avx512_bf16", ("avx512_bf16", "amx_bf16")),  # Intel Sapphire Rapids
    ("Features\t: fp asimd evtstrm aes sha2 bf16 i8mm", ("bf16",)),  # Arm Neoverse V1/V2
    ("flags\t\t: fpu vme avx2 avx512f avx512bw", ()),  # Skylake-X: AVX-512 but no bf16
])
def test_cpu_bf16_flags_read_from_cpuinfo(tmp_path, flags_line, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\n{flags_line}\n\nprocessor\t: 1\n{flags_line}\n")
    assert hardware.cpu_bf16_flags(cpuinfo) == expected


def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    name, dtype, reason = hardware.resolve_precision("auto", CPU)
    assert (name, dtype) == ("bf16", torch.bfloat16)
    assert reason == "auto: this CPU has native bf16 instructions (avx512_bf16)"


def test_auto_precision_is_fp32_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ())
    name, dtype, reason = hardware.resolve_precision("auto", CPU)
    assert (name, dtype) == ("fp32", None)
    assert reason.startswith("auto: this CPU has no native bf16 instructions")


def test_explicit_precision_is_kept_and_unknown_refused(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert hardware.resolve_precision("fp32", CPU)[:2] == ("fp32", None)
    assert hardware.resolve_precision("bf16", CPU)[2] == "set by trainer.precision"
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is not one of auto, bf16, fp16, fp32"):
        hardware.resolve_precision("fp8", CPU)


def test_auto_precision_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.resolve_precision("auto", torch.device("cuda"))[:2] == ("bf16", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.resolve_precision("auto", torch.device("cuda"))[:2] == ("fp16", torch.float16)


def test_channels_last_takes_a_boolean():
    assert hardware.resolve_channels_last(True) is True
    assert hardware.resolve_channels_last(False) is False
    with pytest.raises(ConfigError, match="trainer.channels_last='yes' is not one of true, false"):
        hardware.resolve_channels_last("yes")


def test_adamw_is_fused_on_cuda_and_default_on_cpu():
    cfg = OmegaConf.load(hardware.Path(__file__).resolve().parents[1] / "configs" / "optimizer" / "adamw.yaml")
    model = torch.nn.Linear(3, 1)
    assert build_optimizer(cfg, model, CPU).defaults["fused"] is None
    # The CUDA choice, built here for CPU parameters (torch's fused AdamW also runs on CPU).
    assert build_optimizer(cfg, model, torch.device("cuda")).defaults["fused"] is True
    cfg.fused = False
    assert build_optimizer(cfg, model, torch.device("cuda")).defaults["fused"] is False


def _conv_weight_grads(conv, x, amp: bool):
    grads = []
    for _ in range(3):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = conv(x)
        out.float().square().sum().backward()
        grads.append(conv.weight.grad.clone())
    return grads


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 4), (4, 4, 4)])
def test_guarded_bf16_convolutions_have_fp32_gradients_on_thin_inputs(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False)
    x = torch.randn(2, 32, *shape)
    reference = _conv_weight_grads(conv, x, amp=False)[0]
    assert hardware.guard_cpu_bf16_convolutions(torch.nn.Sequential(conv, torch.nn.Conv3d(2, 2, 1))) == 1
    for grad in _conv_weight_grads(conv, x, amp=True):
        rel = ((grad - reference).abs().max() / reference.abs().max()).item()
        assert rel < 2e-2, (shape, rel)  # bf16 rounding where the input is thick enough, fp32 where thin
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # the rest of the network still sees bf16


def test_fp16_on_a_cpu_warns_that_it_is_slower(caplog):
    with caplog.at_level("WARNING", logger="brain3d.hardware"):
        name, dtype, _ = hardware.resolve_precision("fp16", torch.device("cpu"))
    assert name == "fp16" and dtype is torch.float16
    assert "slower than fp32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brain3d.hardware"):
        hardware.resolve_precision("fp32", torch.device("cpu"))
    assert caplog.text == ""
