"""The benchmark package measures what it claims: real model shapes, baselines that compute the same SAM step as the
op layer, and a CLI that runs end to end and writes the JSON it promises. Fast: the tiny profile only."""

import json
import subprocess
import sys

import pytest
import torch
from sam_fused.bench import baselines, profiles

from sam_fused import _backends, ops


@pytest.mark.parametrize("name, tensors, params", [("resnet50", 161, 25_557_032), ("vit_b16", 152, 86_567_656),
                                                   ("many_small", 2000, 4_096_000)])
def test_profile_counts(name: str, tensors: int, params: int) -> None:
    shapes = profiles.shapes(name)
    assert len(shapes) == tensors
    assert profiles.numel(shapes) == params
    assert len({n for n, _ in shapes}) == tensors  # names are unique, as in a real state_dict


def test_profile_landmarks() -> None:
    resnet = dict(profiles.shapes("resnet50"))
    assert resnet["conv1.weight"] == (64, 3, 7, 7)
    assert resnet["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert resnet["fc.weight"] == (1000, 2048)
    vit = dict(profiles.shapes("vit_b16"))
    assert vit["conv_proj.weight"] == (768, 3, 16, 16)
    assert vit["encoder.pos_embedding"] == (1, 197, 768)
    assert vit["encoder.layers.encoder_layer_11.self_attention.in_proj_weight"] == (2304, 768)
    assert vit["heads.head.weight"] == (1000, 768)


def test_materialize_tiny() -> None:
    named = profiles.shapes("tiny")
    params, grads, backups = profiles.materialize(named, "cpu", torch.bfloat16)
    assert [tuple(p.shape) for p in params] == [s for _, s in named]
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert all(torch.equal(b, p) and b.data_ptr() != p.data_ptr() for b, p in zip(backups, params))


def _reference_perturbed(params: list, grads: list, rho: float, adaptive: bool) -> list:
    p = [x.clone() for x in params]
    sumsq = ops.grad_sumsq(grads, p if adaptive else None, backend="torch")
    ops.perturb_(p, grads, [torch.empty_like(x) for x in p], sumsq, rho, adaptive=adaptive, backend="torch")
    return p


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.05, 50.0])  # 50: the perturbation is as large as the weights, errors in it show
def test_baselines_match_op_layer(adaptive: bool, rho: float) -> None:
    params, grads, _ = profiles.materialize(profiles.shapes("tiny"), "cpu", torch.float32, seed=3)
    original = [p.clone() for p in params]
    expected = _reference_perturbed(params, grads, rho, adaptive)

    # The port takes the norm in fp32, the op layer in fp64: their scales may differ in the last bit, an error that
    # grows with |e| (up to ~rho), hence the atol in proportion to rho.
    atol = 1e-7 * max(1.0, rho / 5)
    old = baselines.loop_first_step(params, grads, rho, adaptive)
    torch.testing.assert_close(params, expected, rtol=1e-6, atol=atol)
    baselines.loop_restore(params, old)
    assert all(torch.equal(p, o) for p, o in zip(params, original))

    backups = [torch.zeros_like(p) for p in params]
    baselines.foreach_first_step(params, grads, backups, rho, adaptive)
    torch.testing.assert_close(params, expected, rtol=1e-6, atol=atol)
    baselines.foreach_restore(params, backups)
    assert all(torch.equal(p, o) for p, o in zip(params, original))


@pytest.mark.parametrize("name", ["loop", "foreach", "torch"])
def test_step_leaves_weights_bit_exact(name: str) -> None:
    params, grads, backups = profiles.materialize(profiles.shapes("tiny"), "cpu", torch.float32)
    original = [p.clone() for p in params]
    baselines.make_impl(name).step(params, grads, backups, rho=0.5, adaptive=True)
    assert all(torch.equal(p, o) for p, o in zip(params, original))
    if name == "torch":
        baselines.fused_step(params, grads, backups, rho=0.5, backend="torch")
        assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_bytes_moved_per_parameter() -> None:
    from sam_fused.bench.__main__ import bytes_moved

    fused, loop = baselines.make_impl("torch"), baselines.make_impl("loop")
    assert [bytes_moved(op, 10, 4, False, fused) for op in ("grad_sumsq", "perturb_", "restore_", "step")] == \
        [40, 160, 80, 280]
    assert bytes_moved("step", 10, 2, False, fused) == 140  # bf16 / fp16: half
    assert bytes_moved("step", 10, 4, True, fused) == 320  # ASAM's norm also reads |w|
    assert bytes_moved("restore_", 10, 4, False, loop) == 0  # the loop swaps storage


def test_cli_end_to_end(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "sam_fused.bench", "--device", "cpu", "--profiles", "tiny", "--quick",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vs loop" in run.stdout and "copy bandwidth" in run.stdout
    table = run.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:3] == ["profile", "op", "backend"])
    assert table[header - 1].startswith("x roofline: ") and "lower is better" in table[header - 1]  # the legend
    # Progress goes to stderr as plain lines when stderr is not a terminal (CI logs, `> file`).
    assert any(line.startswith("[") and "tiny step" in line for line in run.stderr.splitlines()), run.stderr

    report = json.loads(out.read_text())
    assert report["machine"]["copy_bandwidth_gbps"] > 0
    assert {"torch", "threads", "device_name"} <= report["machine"].keys()
    usable, skipped = baselines.device_backends(torch.device("cpu"))
    assert set(report["skipped"]) == set(skipped)
    expected = {(op, b) for op in ("grad_sumsq", "perturb_", "restore_", "step") for b in [*usable, "loop", "foreach"]}
    assert {(r["op"], r["backend"]) for r in report["rows"]} == expected
    for r in report["rows"]:
        assert r["profile"] == "tiny" and r["tensors"] == 8 and r["params"] == profiles.numel(profiles.shapes("tiny"))
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 3
        assert r["speedup_vs_foreach"] is None or r["speedup_vs_foreach"] > 0
        if r["backend"] == "loop":
            assert r["speedup_vs_loop"] == pytest.approx(1.0)
        if r["backend"] == "loop" and r["op"] == "restore_":  # swaps storage: no bytes, no roofline, no comparison
            assert r["bytes"] == 0 and r["gbps"] is None and r["x_roofline"] is None
            continue
        assert r["bytes"] == {"grad_sumsq": 4, "perturb_": 16, "restore_": 8, "step": 28}[r["op"]] * r["params"]
        assert r["gbps"] > 0 and r["x_roofline"] > 0


def test_second_step_bench_end_to_end(tmp_path) -> None:
    out = tmp_path / "second.json"
    cmd = [sys.executable, "-m", "sam_fused.bench.second_step", "--profiles", "tiny", "--repeat", "2", "--warmup", "1",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"restore_ + SGD.step()", "restore_ + SGD(foreach).step()",
                                         "restore_sgd_ (fused)"}
    assert all(r["profile"] == "tiny" and r["median_ms"] > 0 for r in rows)
    assert [r["vs_fused"] for r in rows if r["impl"] == "restore_sgd_ (fused)"] == [1.0]


def test_host_overhead_option(tmp_path) -> None:
    """--host times first_step + restore on 2000 one-element tensors: the per-tensor host cost, per backend and
    level (the SAM optimizer, the op layer), beside the loop port."""
    out = tmp_path / "host.json"
    run = _cli("--device", "cpu", "--host", "--backends", "torch,loop", "--repeat", "2", "--warmup", "1",
               "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "us/tensor" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["level"]) for r in rows} == {("torch", "SAM"), ("torch", "ops"), ("loop", "ops")}
    for r in rows:
        assert r["tensors"] == 2000 and r["us_per_step"] > 0
        assert r["us_per_tensor"] == pytest.approx(r["us_per_step"] / 2000)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam_fused.bench", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cli_refuses_what_cannot_run_here() -> None:
    for args, message in ((["--device", "cuda"], "no CUDA device is visible"),
                          (["--backends", "triton", "--device", "cpu"], "backend triton cannot run on cpu here"),
                          (["--device", "tpu"], "is not a device"),
                          (["--profiles", "resnet"], "unknown profile 'resnet'")):
        run = _cli(*args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert run.stdout == "", args  # no empty table


def test_cli_backend_choices_are_the_backend_table() -> None:
    run = _cli("--backends", "bogus")
    assert run.returncode == 2, run.stderr
    listed = run.stderr.strip().split("choose from ")[1].split(", ")
    assert sorted(listed) == sorted(baselines.impl_names()) == sorted(["auto", *_backends.NAMES, *baselines.BASELINES])


def test_cli_help_reads_like_a_tool() -> None:
    run = _cli("--help")
    assert run.returncode == 0
    assert run.stdout.startswith("usage: python -m sam_fused.bench")
    assert "(default: None)" not in run.stdout and "(default: False)" not in run.stdout
    options = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("  --")]
    assert len(options) >= 10
    for line in run.stdout.split("options:")[1].split("\n  -")[1:]:  # every option says what it does
        assert len(line.split()) > 2, line
