"""The native CPU kernels' ops really run on every intra-op thread and give the same bits on any
thread count (issue 21); the runtime they use is torch's own OpenMP library; the streaming probe of
the benchmarks' roofline computes what it says. Thread counts and bits only, never timings (the build
probe itself is tested in test_native_cpu.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import fastlars
from benchmarks.measure import last_level_cache_bytes
from fastlars import backends
from fastlars._extension import extension

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("native", torch.device("cpu")) is not None,
    reason=f"native CPU kernels not built: {backends.unavailable_reason('native', torch.device('cpu'))}",
)

BIG = [(600_000,), (300, 700), (5,)]  # 50 chunks: more than kGrainChunks for each of 3 threads


@pytest.fixture
def threads():
    """torch.set_num_threads for one test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _omp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def test_the_openmp_runtime_is_torchs() -> None:
    if not _omp():
        pytest.skip("torch's ATen parallel backend is not OpenMP")
    library = Path(extension().cpu_parallel()["library"])
    torch_lib = Path(torch.__file__).parent / "lib"
    if list(torch_lib.glob("libgomp*.so*")):
        assert library.resolve().parent == torch_lib.resolve(), library
    if Path("/proc/self/maps").exists():
        mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
        assert mapped == {str(library)}, mapped


@pytest.mark.parametrize("cls,options", [(fastlars.LARS, {"weight_decay": 1e-2}), (fastlars.LAMB, {}),
                                         (fastlars.LAMB, {"weight_decay": 0.0})], ids=["lars", "lamb", "lamb_1pass"])
def test_steps_run_on_every_thread(threads, cls, options) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in BIG]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = cls(params, lr=0.01, backend="native", **options)
    for n in (2, 1, 3):
        threads(n)
        opt.step()
        used = extension().cpu_last_step_threads()
        assert used == n if _omp() else 1 <= used <= n


def test_steps_are_bit_identical_on_any_thread_count(threads) -> None:
    results = []
    for n in (1, 2, 3):
        threads(n)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in BIG]
        lamb_params = [torch.randn(s, generator=gen).requires_grad_() for s in BIG]
        opts = [fastlars.LARS(params, lr=1.0, weight_decay=1e-2, backend="native"),
                fastlars.LAMB(lamb_params, lr=0.01, max_grad_norm=1.0, backend="native")]
        for _ in range(3):
            for p in params + lamb_params:
                p.grad = torch.randn(p.shape, generator=gen)
            for opt in opts:
                opt.step()
        results.append([p.detach().clone() for p in params + lamb_params])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_stream_pass_probe() -> None:
    ext = extension()
    x, y, z = torch.ones(100_000), torch.ones(100_000), torch.full((100_000,), 2.0)
    assert ext.stream_pass(x, mode="read", repeats=2) > 0
    ext.stream_pass(x, None, z, mode="update", repeats=1)  # x = 0.5 x + z
    assert torch.equal(x, torch.full_like(x, 2.5)) and torch.equal(y, torch.ones_like(y))
    ext.stream_pass(x, y, z, mode="update2", repeats=1)
    assert torch.equal(x, torch.full_like(x, 3.25)) and torch.equal(y, torch.full_like(y, 2.5))
    with pytest.raises(RuntimeError, match="mode"):
        ext.stream_pass(x, mode="copy")
    with pytest.raises(RuntimeError, match="needs y and z"):
        ext.stream_pass(x, y, None, mode="update2")
    with pytest.raises(RuntimeError, match="y must be"):
        ext.stream_pass(x, torch.ones(3), z, mode="update2")


def _getconf(name: str) -> int:
    try:
        out = subprocess.run(["getconf", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 0
    return int(out) if out.isdigit() else 0


def test_lamb_workspace_limit_follows_the_cache(monkeypatch) -> None:
    """Without FASTLARS_LAMB_WORKSPACE_ELEMENTS, LAMB keeps u between its passes for groups whose five fp32
    arrays fit in a quarter of the last-level cache the kernel lists in sysfs (else glibc's sysconf, as
    getconf reads it), at least one group of 2^18; the variable overrides it, read at every step."""
    ext = extension()
    monkeypatch.delenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS")
    plan = ext.cpu_cache_plan()
    cache = last_level_cache_bytes() or _getconf("LEVEL3_CACHE_SIZE") or _getconf("LEVEL2_CACHE_SIZE")
    assert plan["last_level_cache_bytes"] == cache
    assert plan["group_elements"] == 1 << 18
    assert plan["lamb_workspace_elements"] == max(1 << 18, cache // 80)
    monkeypatch.setenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS", "12345")
    assert ext.cpu_cache_plan()["lamb_workspace_elements"] == 12345
