"""bench.py on the CPU: its cpu mode end to end (table and plot), and how it labels budgets. The GPU modes run
only on a GPU (BENCHMARKS.md has their output)."""
import re
import statistics
import types

import pytest
import torch

import bench
import engine
import model as model_module
import offload
from tests.helpers import markdown_tables


def test_budget_labels():
    assert bench.budget_labels(2048, 131072, [1 / 64, 2048]) == ["K = S/64", "K = 2048"]   # one K, two rules
    assert bench.budget_labels(512, 32768, [1 / 64, 2048.0]) == ["K = S/64"]
    assert bench.budget_labels(2048, 32768, [1 / 64, 2048.0]) == ["K = 2048"]
    assert bench.budget_labels(30, 100, [0.3, 3 / 10]) == ["K = 0.3 S"] * 2  # not 1/n: not "S/3", one label
    assert bench.budget_labels(96, 2048, [3 / 64]) == ["K = 0.046875 S"]
    assert bench.budget_labels(2, 98, [1 / 49]) == ["K = S/49"]  # 1 / (1/49) is 49.00000000000001 in floats


def test_kernel_kinds():
    """The e2e census sorts a decode step's kernels by the names they carry in torch.profiler."""
    kinds = {"_topk_score_kernel": "HATA", "_sparse_attn_merge_kernel": "HATA", "_hash_encode_kernel": "HATA",
             "_hamming_score_kernel": "HATA", "_select_topk_kernel": "HATA",
             "void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>(Params)": "SDPA",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "SDPA", "cudnn_generated_fort_native_sdpa_sm90": "SDPA",
             "void gemv2T_kernel_val<int, int, __nv_bfloat16>": "GEMV/GEMM",
             "nvjet_tst_64x8_64x16_4x1_v_bz": "GEMV/GEMM",
             "void splitKreduce_kernel<32, 16>": "GEMV/GEMM", "sm90_xmma_gemm_bf16bf16_bf16f32": "GEMV/GEMM",
             "triton_poi_fused_mul_silu_0": "other", "_cache_write_kernel": "other",
             "triton_red_fused__to_copy_mean_pow_rsqrt_1": "other"}
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds


def test_cpu_mode_prints_a_table_and_writes_a_plot(gguf_path, tmp_path, capsys):
    png = tmp_path / "cpu.png"
    bench.main(["cpu", "--seqlens", "16", "48", "--budget", "20", "--rounds", "1", "--steps", "1", "--plot", str(png)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16 |") or line.startswith("| 48 |")]
    assert len(rows) == 2 and "K >= S: dense" in rows[0] and rows[1].endswith("x |")
    assert rows[0].startswith("| 16 | 20 |") and rows[1].startswith("| 48 | 20 |")  # K of each step
    dense, hata, speedup = (float(c.strip(" x")) for c in rows[1].split("|")[3:6])  # | 48 | K | dense | HATA | ratio |
    assert abs(speedup - dense / hata) <= 0.02 * dense / hata + 0.01  # the ratio of the printed (rounded) columns
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_line_with_no_points_is_left_out_of_the_plot(tmp_path, monkeypatch):
    """HATA at contexts its K covers has no points: no empty line, and no legend entry for one."""
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k["label"]) or plot(ax, *a, **k))
    bench.plot_speed(str(tmp_path / "x.png"), [("t", "ms", "linear", {"dense": [(16, 1.0), (64, 2.0)], "HATA": []},
                                                 None)])
    assert drawn == ["dense"] and (tmp_path / "x.png").exists()


def test_plotted_lines_of_equal_values_differ_in_marker_and_size(tmp_path, monkeypatch):
    """K = S/64 and K = 2048 time alike at 128K (the same K) or where latency binds: the later line, drawn over the
    earlier, must not hide it."""
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k) or plot(ax, *a, **k))
    same = [(8192, 1.0), (131072, 2.0)]
    bench.plot_speed(str(tmp_path / "x.png"), [("t", "ms", "log", {"a": same, "b": same, "c": same}, None)])
    assert len({k["marker"] for k in drawn}) == 3 and drawn[0]["ms"] > drawn[1]["ms"] > drawn[2]["ms"]


def test_cpu_budget_takes_a_fraction_of_each_context(gguf_path, tmp_path, capsys, monkeypatch):
    """--budget 1/4 as engine.py reads it, of the cache (S + 1 slots): sparse at both contexts (3 of 8, 13 of 48);
    in bf16 (--dtype) every step, and the table says so."""
    png, dtypes, step = tmp_path / "cpu.png", set(), engine.decode_one_token
    monkeypatch.setattr(engine, "decode_one_token", lambda m, *a: dtypes.add(m.output.weight.dtype) or step(m, *a))
    bench.main(["cpu", "--seqlens", "8", "48", "--budget", "1/4", "--rounds", "1", "--steps", "1", "--plot", str(png),
                "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "HATA: K = S/4, R = 128" in out and "decode step, bfloat16, CPU" in out and dtypes == {torch.bfloat16}
    rows = [line for line in out.splitlines() if line.startswith(("| 8 |", "| 48 |"))]
    assert len(rows) == 2 and all(row.endswith("x |") for row in rows)  # K < S at both: a speedup, not "dense"
    assert rows[0].startswith("| 8 | 3 |") and rows[1].startswith("| 48 | 13 |")  # the table says which K
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, words", [(["cpu", "--steps", "0"], "--steps: must be a whole number >= 1, got '0'"),
                                         (["cpu", "--seqlens", "16", "-4"], "--seqlens: must be a whole number >= 1"),
                                         (["e2e", "--batches", "0"], "--batches: must be a whole number >= 1"),
                                         (["e2e", "--budgets", "0"], "budget '0' is not a whole count >= 1"),
                                         (["cpu", "--budget", "2/1"], "budget '2/1' is not a whole count >= 1")])
def test_bad_flags_get_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and f"(see python bench.py {argv[0]} --help)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the e2e run would start")
def test_e2e_budgets_take_fractions(capsys):
    with pytest.raises(SystemExit):
        bench.main(["e2e", "--budgets", "1/64", "2048"])
    err = capsys.readouterr().err  # parsed: only the missing GPU stops it, naming the mode that runs here
    assert "bench.py e2e needs a CUDA GPU; on the CPU, bench.py cpu times the default model" in err


def test_a_context_beyond_the_model_or_every_context_within_the_budget_is_one_error_line(gguf_path, capsys, tmp_path,
                                                                                          monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(bench, "from_checkpoint", lambda *a, **k: 1 / 0)  # the context is checked before the weights load
        argv = ["cpu", "--seqlens", "16", "16384", "--rounds", "1", "--steps", "1", "--plot", "unused.png"]
        assert bench.main(argv) == 2
        out, err = capsys.readouterr()
        assert "error: --seqlens 16384 exceed the default model's context, 8192" in err
        assert out == ""  # refused before anything is printed, the header line included
        assert bench.main(["cpu", "--seqlens", "16", "512", "--plot", "unused.png"]) == 2  # K = 512: dense at both
        out, err = capsys.readouterr()  # (before the weights load too; before: after)
        assert ("error: no budget (K = 512) is below any of --seqlens 16 512: the model would decode every step "
                "densely; give a longer --seqlens or a smaller --budget") in err
        assert out == ""  # before any timing
    assert bench.main(["cpu", "--seqlens", "8192", "--budget", "8191/8192", "--rounds", "1", "--steps", "1", "--plot",
                       str(tmp_path / "p.png")]) == 0  # K = 8191 of the full 8192-token cache (not of 8193: refused)
    assert re.search(r"^\| 8192 \| 8191 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", capsys.readouterr().out, re.M)  # sparse


@pytest.mark.parametrize("argv, words", [(["e2e", "--seqlens", "512", "2048", "--prefill-len", "512"],
                                          "2048 tokens (--seqlens, --prefill-len) exceed the tiny context of 1024"),
                                         (["e2e", "--seqlens", "512", "--prefill-len", "4096"], "4096 tokens"),
                                         (["e2e", "--seqlens", "512", "--prefill-len", "1"],
                                          "--prefill-len 1: too short for HATA to hash its keys"),
                                         (["offload", "--seqlen", "512", "--budget", "512"],
                                          "--budget 512 (512 tokens) must be"),
                                         (["offload", "--seqlen", "512", "--budget", "0.999"],  # as e2e's --budgets
                                          "--budget 0.999 (512 tokens) must be below --seqlen 512"),
                                         (["offload", "--seqlen", "4096"],  # (before: named the budget, which is fine)
                                          "--seqlen 4096 exceeds the tiny context of 1024 tokens"),
                                         (["offload", "--seqlen", "512", "--budget", "64", "--host-gb", "0"],
                                          "--host-gb must be a number of GiB > 0, got 0.0"),
                                         (["offload", "--seqlen", "512", "--budget", "64", "--host-gb", "inf"],
                                          "--host-gb must be a number of GiB > 0, got inf"),  # (int(inf): a traceback)
                                         (["offload", "--seqlen", "512", "--budget", "64", "--host-gb", "1e-9"],
                                          "GiB) are available; lower --max-seq-len or the batch (here: --seqlen, or "
                                          "--host-gb)"),
                                         (["e2e", "--seqlens", "512", "--budgets", "512", "2048",
                                           "--prefill-len", "512"],
                                          "no budget (K = 512, K = 2048) is below any of --seqlens 512: the model "
                                          "would decode every step densely; give a longer --seqlens or a smaller "
                                          "--budgets"),
                                         (["attention", "--rbit", "48"],
                                          "--rbit must be a multiple of 32 (whole int32 code words) in [32, 1024], "
                                          "got 48"),
                                         (["attention", "--rbit", "2048"], "in [32, 1024], got 2048"),
                                         (["attention", "--seqlens", "1"],
                                          "no budget (K = S/64, K = 2048) is below any of --seqlens 1: the model "
                                          "would decode every step densely; give a longer --seqlens\n")])
def test_gpu_modes_refuse_bad_sizes_before_any_work(argv, words, capsys, monkeypatch):
    # the checks come before any CUDA work, and before the weights are built
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine, "random_model", lambda *a, **k: 1 / 0)
    assert bench.main(argv + (["--preset", "tiny"] if argv[0] != "attention" else [])) == 2
    out, err = capsys.readouterr()
    assert words in err and out == ""  # refused before anything is printed, the header line included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_e2e_times_dense_and_hata_replays_alternating(capsys, tmp_path, monkeypatch):
    """The tiny preset end to end on the GPU: each HATA budget's graph is timed beside the dense one (Timer.time, two
    graphs) after set_hata has changed the policy, and the rows, the census and the prefill lines come out."""
    timed = []
    time = bench.Timer.time
    monkeypatch.setattr(bench.Timer, "time", lambda self, *fns: timed.append(len(fns)) or time(self, *fns))
    assert bench.main(["e2e", "--preset", "tiny", "--seqlens", "512", "--batches", "1", "2", "--budgets", "16", "64",
                       "--steps", "3", "--prefill-len", "512", "--profile", "--plot", str(tmp_path / "e2e.png")]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| 512 \| [12] \| ", line)]
    assert [(r[1], r[2]) for r in rows if len(r) == 9] == [("1", "16"), ("1", "64"), ("2", "16"), ("2", "64")]
    assert timed.count(2) == 4 and "dense and HATA alternating" in out and "with key hashing" in out, out
    assert (tmp_path / "e2e.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_e2e_names_a_point_out_of_gpu_memory_and_times_the_others(capsys, monkeypatch, tmp_path):
    """A point whose caches do not fit (B=4 at 128K on an 80 GB H100) is named, not the end of the run: the
    table and the prefill lines come out for the others."""
    fill = bench.fill_random_kv

    def fill_or_fail(model):
        if model.max_batch_size == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        fill(model)
    monkeypatch.setattr(bench, "fill_random_kv", fill_or_fail)
    assert bench.main(["e2e", "--preset", "tiny", "--seqlens", "512", "--batches", "1", "2", "--budgets", "16",
                       "--steps", "3", "--prefill-len", "512", "--plot", str(tmp_path / "e2e.png")]) == 0
    out = capsys.readouterr().out
    assert "S=512 B=2: out of GPU memory; not timed" in out and "with key hashing" in out, out
    assert [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| 512 |")] == ["1"]


def test_a_run_of_other_points_leaves_the_report_plot_alone(monkeypatch, capsys):
    """report/bench_MODE.png is the default points' plot: a run of other contexts, batches or budgets does not
    overwrite it (it draws only to a given --plot); other flags (rounds, steps) keep the default points."""
    plots = []
    monkeypatch.setattr(bench, "bench_cpu", lambda args: plots.append(args.plot) or 0)
    report = f"{bench.HERE}/report/bench_cpu.png"
    for argv, want in ((["cpu"], report), (["cpu", "--rounds", "1"], report), (["cpu", "--seqlens", "16"], None),
                       (["cpu", "--budget", "1/4"], None), (["cpu", "--dtype", "bfloat16"], None),
                       (["cpu", "--seqlens", "16", "--plot", "x.png"], "x.png")):
        assert bench.main(argv) == 0 and plots[-1] == want, argv
        assert ("did not draw report/bench_" in capsys.readouterr().err) == (want is None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "bench_e2e", lambda args: plots.append(args.plot) or 0)
    for argv, want in ((["e2e"], None), (["e2e", "--compile"], f"{bench.HERE}/report/bench_e2e.png")):
        assert bench.main(argv) == 0 and plots[-1] == want, argv  # the README's plot is of --compile steps
        assert ("not the default points with --compile" in capsys.readouterr().err) == (want is None)
    def refused(args):
        raise ValueError("--seqlens 16384 exceed the context")
    monkeypatch.setattr(bench, "bench_cpu", refused)
    assert bench.main(["cpu", "--seqlens", "16384"]) == 2  # a refused run: its error only, no note about a plot
    assert capsys.readouterr().err == "error: --seqlens 16384 exceed the context\n"


def test_points_given_twice_or_out_of_order_run_once_along_s(monkeypatch):
    """--seqlens 1024 16 16 runs 16, then 1024 (an unsorted list drew its plot's lines back and forth); batches once
    and ascending; each shape and budget once, in the order given."""
    seen = []
    monkeypatch.setattr(bench, "bench_cpu", lambda args: seen.append(args.seqlens) or 0)
    assert bench.main(["cpu", "--seqlens", "1024", "16", "16", "--plot", "x.png"]) == 0 and seen == [[16, 1024]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "bench_attention", lambda args: seen.append((args.shapes, args.batches)) or 0)
    assert bench.main(["attention", "--shapes", "default", "llama8b", "default", "--batches", "8", "1", "8"]) == 0
    assert seen[-1] == (["default", "llama8b"], [1, 8])
    monkeypatch.setattr(bench, "bench_e2e", lambda args: seen.append(args.budgets) or 0)
    assert bench.main(["e2e", "--budgets", "2048", "1/64", "2048"]) == 0 and seen[-1] == [2048, 1 / 64]


@pytest.mark.parametrize("plot", ["", "report", "x.svg", "xpng", "folder.png", "/proc/x.png", "x" * 300 + ".png"])
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_timings(plot, monkeypatch, capsys, tmp_path):
    """Also a folder named x.png, a folder that takes no file (/proc) and a name longer than the file system takes:
    before, each failed after the timings."""
    monkeypatch.setattr(bench, "bench_cpu", lambda args: pytest.fail("timed before refusing --plot"))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SystemExit) as e:
        bench.main(["cpu", "--plot", str(tmp_path / plot) if plot == "folder.png" else plot])
    words = ("--plot: cannot write in /proc" if plot.startswith("/proc") else "(a name of 304 bytes" if len(plot) > 300
             else "give a .png file")
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "(see python bench.py cpu --help)" in err  # the mode's options


def test_a_plot_in_a_new_folder_is_drawn_there(monkeypatch, tmp_path):
    """--plot in a folder that does not exist yet: made at the save (as eval.py's --out-dir), none before the run."""
    from matplotlib.figure import Figure
    plot = tmp_path / "new" / "deeper" / "x.png"

    def bench_cpu(args):  # the run: no folder made yet
        assert not (tmp_path / "new").exists()
        engine.write_png(args.plot, Figure())
    monkeypatch.setattr(bench, "bench_cpu", bench_cpu)
    assert bench.main(["cpu", "--plot", str(plot)]) == 0 and plot.read_bytes().startswith(b"\x89PNG")


def test_budget_label_of_one_token():
    assert bench.budget_label(1) == "K = 1" and bench.budget_label(2048.0) == "K = 2048"


def test_kernel_bytes():
    """B=2, Hkv=3 (6 rows), G=4, D=64, S=1000, W=4, K=100 (two 64-row splits), bf16."""
    assert bench.kernel_bytes(2, 3, 4, 64, 1000, 4, 100, 2) == {
        "topk.score": 6 * 1000 * (4 * 4 + 2),                        # codes in, int16 keys out
        "topk.compact": 6 * 1000 * 2 + 6 * 100 * 4,                  # keys in, int32 indices out
        "attn.split": 6 * 100 * (2 * 64 * 2 + 4) + 6 * 2 * 4 * 65 * 4}  # K, V rows + indices; fp32 partials + lse


def test_floor_bytes():
    """Llama-3.1-8B's shape (Hkv=8, G=4, D=128, R=128: W=4), bf16, 128K keys, K=2048, B=1 and 8, by hand."""
    for B in (1, 8):
        codes, rows, proj, q_k = B * 8 * 131072 * 16, 2 * B * 8 * 2048 * 128 * 2, 8 * 128 * 128 * 4, B * 40 * 128 * 2
        assert bench.floor_bytes(B, 8, 4, 128, 131072, 4, 2048, 2) == (codes + rows + proj + q_k,
                                                                       2 * B * 8 * 131072 * 128 * 2)
    assert bench.floor_bytes(1, 8, 4, 128, 131072, 4, 2048, 2) == (25_700_352, 536_870_912)


def test_attention_tables():
    row = dict(shape="llama8b", B=1, S=131072, budget=2048, dense_ms=2.0, hata_ms=0.5, floor_ms=0.25,
               dense_floor_ms=1.0, per_kernel={"hash": 0.01, "topk.score": 0.1}, kernel_bytes={"topk.score": 4e8})
    assert [bench.fmt_s(S) for S in (131072, 1024, 1000, 48, 1536, 3072)] == ["128K", "1K", "1000", "48", "1536",
                                                                               "3K"]
    assert bench.table([row]).splitlines()[2] == \
        "| llama8b | 1 | 128K | 2048 | 2.0000 | 0.5000 | 4.00x | 0.2500 | 50% | 2.00x |"
    assert bench.table([{**row, "floor_ms": 0.1}]).splitlines()[2] == \
        "| llama8b | 1 | 128K | 2048 | 2.0000 | 0.5000 | 4.00x | 0.1000 | 20% | 2.00x |"  # dense's own floor ratio
    lines = bench.breakdown_table([row]).splitlines()
    assert lines[2] == "| shape | B | S | budget | hash | topk.score |"
    assert lines[4] == "| llama8b | 1 | 128K | 2048 | 0.0100 | 0.1000 (4.00) |"  # 4e8 bytes in 0.1 ms: 4 TB/s


def test_timer_alternates_its_graphs_and_measures_the_read_bandwidth(monkeypatch):
    """Several fns' replays alternate, each after a flush of the L2, and each gets its own median; the read
    bandwidth is the flush buffer's first half over the median time of its sum. (No GPU: graphs replay the fn.)"""
    log, ms = [], iter([1.0, 10.0, 3.0, 30.0, 2.0, 20.0, 0.5, 0.25, 2.0])
    monkeypatch.setattr(bench.Timer, "graph", lambda self, fn: types.SimpleNamespace(replay=fn))
    monkeypatch.setattr(bench, "event_ms", lambda replay: (replay(), next(ms))[1])
    timer = bench.Timer.__new__(bench.Timer)
    timer.reps, timer.sink = 3, torch.zeros((), dtype=torch.int64)
    timer.flush_buf = types.SimpleNamespace(sum=lambda dtype: log.append("flush") or 0)
    assert timer.time(lambda: log.append("a"), lambda: log.append("b")) == [2.0, 20.0]
    assert log == ["a", "b"] + ["flush", "a", "flush", "b"] * 3  # one warm-up replay each, then alternating
    timer.flush_buf = torch.zeros(1024, dtype=torch.int32)
    assert timer.read_bw() == 2048 / 0.5e-3  # 2 KiB read in the median 0.5 ms


def test_floors_are_over_the_fastest_read_of_the_run():
    """SDPA reading its cache faster than the plain read (5 against 4 TB/s): the floors are over SDPA's rate, so that
    no row's dense time beats its floor; a faster plain read wins in turn."""
    rows = [dict(dense_bytes=4e9, dense_ms=1.0, hata_bytes=1e9), dict(dense_bytes=2e9, dense_ms=0.4, hata_bytes=5e8)]
    assert bench.add_floors(rows, 4e12) == 5e12
    assert [(r["floor_ms"], r["dense_floor_ms"]) for r in rows] == [(0.2, 0.8), (0.1, 0.4)]
    assert bench.add_floors(rows, 10e12) == 5e12 and rows[0]["dense_floor_ms"] == 0.4


def test_attention_rbit_is_one_of_the_plots_points(monkeypatch, capsys):
    plots = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "bench_attention", lambda args: plots.append(args.plot) or 0)
    report = f"{bench.HERE}/report/bench_attention.png"  # the default points; --reps is not one of them
    for argv, want in ((["attention"], report), (["attention", "--rbit", "64"], None),
                       (["attention", "--reps", "5"], report)):
        assert bench.main(argv) == 0 and plots[-1] == want, argv


class Checked(Exception):
    """print_header reached: the sizes passed every check."""


@pytest.mark.parametrize("argv", [["cpu", "--seqlens", "8192"],
                                  ["offload", "--preset", "tiny", "--seqlen", "1024", "--budget", "64"],
                                  ["offload", "--preset", "tiny", "--seqlen", "1024", "--budget", "1/64"],
                                  ["e2e", "--preset", "tiny", "--seqlens", "1024", "--prefill-len", "1024"]])
def test_a_size_at_the_models_context_is_accepted(argv, gguf_path, monkeypatch):
    """A context exactly the model's passes each mode's size checks (they refuse one token more)."""
    def reached(mode):
        raise Checked()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "print_header", reached)
    with pytest.raises(Checked):
        bench.main(argv)


def run_cpu(*flags):
    """bench.py cpu on one thread (this process's count restored after), at small sizes; returns main's code."""
    threads = torch.get_num_threads()
    try:
        return bench.main(["cpu", "--rounds", "1", "--threads", "1", *flags])
    finally:
        torch.set_num_threads(threads)


def test_cpu_mode_times_only_the_steps_after_warm_up_and_plots_hata_where_sparse(gguf_path, monkeypatch, capsys):
    """... in caches one slot longer than the context, as engine.py's steps attend over a prefix of theirs."""
    panels, sizes, caches = [], [], []
    monkeypatch.setattr(bench, "plot_speed", lambda path, p: panels.extend(p))
    setup = model_module.Transformer.setup_caches
    monkeypatch.setattr(model_module.Transformer, "setup_caches",
                        lambda model, B, S: caches.append((B, S)) or setup(model, B, S))
    monkeypatch.setattr(bench, "statistics", types.SimpleNamespace(
        median=lambda xs: sizes.append(len(xs)) or statistics.median(xs)))
    run_cpu("--seqlens", "16", "48", "--budget", "20", "--steps", "2", "--plot", "x.png")
    assert sizes == [2] * 4  # dense and HATA at each context: rounds x steps, the warm-up step left out
    assert caches == [(1, 17), (1, 49)]
    out = capsys.readouterr().out
    assert "CPU (1 thread)" in out
    (_, _, _, lines, _), = panels
    assert [S for S, _ in lines["dense"]] == [16, 48] and [S for S, _ in lines["HATA, K = 20"]] == [48]
    rows = {int(r.split("|")[1]): r.split("|")[3:5] for r in out.splitlines() if r.startswith(("| 16 |", "| 48 |"))}
    assert [f"{ms:.1f}" for _, ms in lines["dense"]] == [rows[16][0].strip(), rows[48][0].strip()]  # the table's
    assert f"{lines['HATA, K = 20'][0][1]:.1f}" == rows[48][1].strip()  # dense and HATA columns, each on its line


def test_cpu_mode_marks_a_context_the_budget_covers_as_dense_in_its_table(gguf_path, monkeypatch, capsys):
    """A context S whose budget K equals it (--budget 16, S = 16) decodes densely, and its table row says so rather
    than give a speedup of dense over dense; at S = 48 the same K selects, and the row gives HATA's speedup. Each
    step decodes at position S - 1 (of an S + 1 slot cache)."""
    seen, real = [], engine.decode_one_token
    monkeypatch.setattr(engine, "decode_one_token", lambda model, cur, pos: seen.append((pos.tolist(), model.hata))
                        or real(model, cur, pos))
    monkeypatch.setattr(bench, "plot_speed", lambda path, panels: None)
    run_cpu("--seqlens", "16", "48", "--budget", "16", "--steps", "1", "--plot", "x.png")
    # dense, then HATA (a warm-up step and a timed one each): at S = 16 'HATA' runs with no policy, dense
    assert [(pos, hata is None) for pos, hata in seen] == [([15], True)] * 4 + [([47], True)] * 2 + [([47], False)] * 2
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith(("| 16 |", "| 48 |"))}
    assert rows["16"].startswith("| 16 | 16 |") and rows["16"].endswith("| - (K >= S: dense) |"), rows
    assert rows["48"].startswith("| 48 | 16 |") and re.search(r"\| \d+\.\d\dx \|$", rows["48"]), rows


def test_check_hata_passes_the_refs_and_catches_each_kind_of_error():
    """The gate before every attention timing, with the refs standing in for the kernels (odd sizes, G = 3): it
    passes their results and refuses a changed index, an output off by 1e-3 and two differing code words."""
    import hata_kernels as hk
    torch.manual_seed(0)
    B, H, Hkv, D, S, R, budget = 2, 6, 2, 16, 37, 64, 7
    k_cache, v_cache, q = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, H, D)
    proj, lengths = torch.randn(Hkv, D, R), torch.tensor([S, 29])
    codes, q_codes = hk.hash_encode_ref(k_cache, proj), hk.hash_encode_ref(q[:, :, None], proj)[:, :, 0]
    idx = hk.hamming_topk_ref(q_codes, codes, lengths, budget)
    out = hk.sparse_decode_attention_ref(q, k_cache, v_cache, idx)
    check = lambda **kw: bench.check_hata(**{**dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_cache[:, :, -1],
                                                     codes=codes, lengths=lengths, proj=proj, budget=budget,
                                                     q_codes=q_codes, idx=idx, out=out), **kw})
    check()
    check(idx=idx.flip(-1))  # a selection is a set: its order does not matter
    wrong = idx.clone()
    wrong[1, 0, 0] = (set(range(29)) - set(idx[1, 0].tolist())).pop()  # one token the ref did not select
    two = q_codes.clone()
    two[0, 0, 0] ^= 1
    two[1, 4, 1] ^= 1  # (one word may differ: an fp32 projection within rounding of zero)
    unwritten = codes.clone()
    unwritten[:, :, -1].bitwise_not_()  # the new key's code, as bench_one spoils it before the step writes it
    for kw, words in ((dict(idx=wrong), "hamming_topk != ref"), (dict(out=out + 1e-3), "attention error"),
                      (dict(q_codes=two), "hash codes differ from the ref in 2 words"),
                      (dict(codes=unwritten), "hash codes differ from the ref in 8 words")):
        with pytest.raises(AssertionError, match=words):
            check(**kw)


def test_kernel_census_sums_kernels_by_kind_and_leaves_out_runtime_calls(monkeypatch):
    """e2e --profile's census, on a stand-in profiler: cudaGraphLaunch's time holds the graph's kernels, so it is
    left out (else counted twice); hata_kernels' cache_write is 'other' (dense steps run it too)."""
    us = {"_topk_score_kernel": 30.0, "_sparse_attn_merge_kernel": 4.0, "_hash_encode_kernel": 6.0,
          "cudaGraphLaunch": 900.0, "nvjet_tst_gemv": 500.0, "flash_fwd_splitkv_kernel": 40.0,
          "triton_poi_fused_rms_norm_0": 8.0, "_cache_write_kernel": 2.0, "Memcpy DtoD": 0.0}

    class Profile:
        def __init__(self, activities):
            pass
        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None
        key_averages = lambda self: [types.SimpleNamespace(key=k, self_device_time_total=t) for k, t in us.items()]
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    kinds, hata = bench.kernel_census(lambda: None)
    assert kinds == pytest.approx({"HATA": 0.040, "GEMV/GEMM": 0.5, "SDPA": 0.04, "other": 0.010})
    assert hata == pytest.approx({"score": 0.030, "merge": 0.004, "hash_encode": 0.006})


# From a mutation run of bench.py's CPU paths (arithmetic, tables, plot, checks): behaviour no test held before


def test_a_plot_draws_s_on_a_log2_axis_labelled_as_the_table_and_the_reference_only_where_given(monkeypatch):
    """Each panel: the context S on a log2 axis with the table's labels (1K, 3K, 1000), the panel's own y scale, and a
    dashed reference line only where the panel gives one (the speedup panel's 1)."""
    figs = []
    monkeypatch.setattr(engine, "write_png", lambda path, fig: figs.append(fig))
    bench.plot_speed("x.png", [("latency", "ms", "log", {"dense": [(1000, 3.0), (1024, 1.0), (3072, 2.0)]}, None),
                               ("speedup", "dense / HATA", "linear", {"B=1": [(1024, 2.0)]}, 1)])
    latency, speedup = figs[0].axes
    assert [t.get_text() for t in latency.get_xticklabels()] == ["1000", "1K", "3K"]
    assert (latency.get_xscale(), latency.xaxis.get_transform().base, latency.get_yscale()) == ("log", 2, "log")
    assert speedup.get_yscale() == "linear" and len(latency.lines) == 1  # the latency panel: its data line alone
    assert len(speedup.lines) == 2 and list(speedup.lines[-1].get_ydata()) == [1, 1]


def test_a_plot_path_in_capitals_is_a_png(monkeypatch, tmp_path):
    """--plot X.PNG is a .png file like x.png (the extension is read case-blind)."""
    plots = []
    monkeypatch.setattr(bench, "bench_cpu", lambda args: plots.append(args.plot) or 0)
    assert bench.main(["cpu", "--plot", str(tmp_path / "X.PNG")]) == 0 and plots == [str(tmp_path / "X.PNG")]


def test_kernel_kinds_are_read_whatever_the_case():
    """A kernel's kind is read from its name whatever the case: 'FlashAttn...' is SDPA, 'Gemv...' a GEMV."""
    assert bench.kernel_kind("FlashAttnFwdSm90<Flash_fwd_kernel_traits<128>>") == "SDPA"
    assert bench.kernel_kind("GemvKernel<bf16>") == "GEMV/GEMM"


@pytest.mark.usefixtures("gguf_path")  # the default model
def test_cpu_mode_reports_milliseconds_per_step(monkeypatch, capsys):
    """A clock that moves 6 ms over a dense step and 4 ms over a HATA one: 6.0 and 4.0 ms/token, speedup 6 / 4."""
    clock = [0.0]
    real = engine.decode_one_token

    def step(model, cur, pos):
        clock[0] += 0.006 if model.hata is None else 0.004
        return real(model, cur, pos)
    monkeypatch.setattr(engine, "decode_one_token", step)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert run_cpu("--seqlens", "48", "--budget", "20", "--steps", "1") == 0
    assert "| 48 | 20 | 6.0 | 4.0 | 1.50x |" in capsys.readouterr().out.splitlines()


def test_offload_host_gb_is_gibibytes(monkeypatch):
    """--host-gb 1.5 lets the offload plan pin 1.5 * 2**30 bytes (not 1.5e9), as its help and errors say GiB."""
    limits = []

    def plan(model, B, S, host_limit=None):
        limits.append(host_limit)
        raise Checked()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(offload, "plan_offload", plan)
    with pytest.raises(Checked):
        bench.main(["offload", "--preset", "tiny", "--seqlen", "512", "--budget", "64", "--host-gb", "1.5"])
    assert limits == [3 * 2 ** 29]


# From a mutation run of the table and plot helpers: behaviour no test held before


def test_each_attention_tables_separator_has_a_cell_per_column():
    row = dict(shape="llama8b", B=1, S=131072, budget=2048, dense_ms=2.0, hata_ms=0.5, floor_ms=0.25,
               dense_floor_ms=1.0, per_kernel={"hash": 0.01, "topk.score": 0.1}, kernel_bytes={})
    assert markdown_tables(bench.table([row])) == markdown_tables(bench.breakdown_table([row])) == 1


def test_a_budget_of_no_1_n_fraction_is_labelled_to_6_significant_digits():
    assert bench.budget_label(2 / 3) == "K = 0.666667 S"  # not 0.6666666666666666


def test_each_plot_panel_has_a_legend_of_its_lines(monkeypatch):
    figs = []
    monkeypatch.setattr(engine, "write_png", lambda path, fig: figs.append(fig))
    bench.plot_speed("x.png", [("latency", "ms", "log", {"dense": [(1024, 1.0)], "HATA": [(1024, 0.5)]}, None),
                               ("speedup", "dense / HATA", "linear", {"B=1": [(1024, 2.0)]}, 1)])
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figs[0].axes] == [["dense", "HATA"],
                                                                                             ["B=1"]]


# From a mutation run of bench.py's CPU parts (labels, refusals, report points), 2026-12-07

def test_a_1_n_budget_is_labelled_by_the_nearest_n():
    """1 / (1/93) is 92.99999999999999 in floats: the label rounds it to 93 (truncating gave 'S/92')."""
    assert bench.budget_label(1 / 93) == "K = S/93" and bench.budget_labels(1, 93, [1 / 93]) == ["K = S/93"]


def test_the_all_dense_refusal_takes_a_fraction_of_the_cache_not_of_the_context():
    """cpu's cache is S + 1 slots: 47/48 of 49 slots is K = 48 = S, every step dense, refused; of a 48-slot cache it
    is 47 tokens, sparse."""
    with pytest.raises(ValueError, match=r"no budget \(K = 0.979167 S\) is below any of --seqlens 48"):
        bench.refuse_all_dense([47 / 48], {48: 49}, "--budget")
    bench.refuse_all_dense([47 / 48], {48: 48}, "--budget")


@pytest.mark.parametrize("argv", [["attention", "--shapes", "llama8b"], ["attention", "--batches", "1"],
                                  ["e2e", "--compile", "--preset", "tiny"], ["e2e", "--compile", "--batches", "1"]])
def test_each_point_off_its_default_leaves_the_report_plot_alone(argv, monkeypatch):
    """Shapes, batches and the preset are points of the report plot as contexts and budgets are."""
    plots = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, f"bench_{argv[0]}", lambda args: plots.append(args.plot) or 0)
    assert bench.main(argv) == 0 and plots == [None]


def test_the_usage_lines_give_each_modes_default_points():
    """The docstring's `python bench.py MODE [--flag values]` lines are the default points the report plots show:
    each flag's values there parse to the mode's default."""
    _, sub = bench.build_parser()
    usage = re.findall(r"python bench.py (\w+) ((?:\[[^\]]*\]\s*)+)", bench.__doc__)
    assert [mode for mode, _ in usage] == ["attention", "offload", "e2e", "cpu"]
    for mode, flags in usage:
        for flag, values in re.findall(r"\[(--[\w-]+) ?([^\]]*)\]", flags):
            if values:  # (--compile, --profile: switches, off by default)
                dest = flag[2:].replace("-", "_")
                parsed = getattr(sub.choices[mode].parse_args([flag, *values.split(" or ")[0].split()]), dest)
                assert parsed == sub.choices[mode].get_default(dest), (mode, flag)
