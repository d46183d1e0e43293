"""The Python package, installed from its wheel into a fresh venv (scripts/test.sh):
the API against the command line on the same pairs, Ctrl-C, errors, the stubs, the
console script. See: issue 15."""

import ast
import inspect as pyinspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import weightdiff

BIN = str(Path(sys.executable).parent / "weightdiff")

# Seconds: per-tensor timings differ from run to run; every other metric must not.
TIMINGS = {"total_time", "compute_time", "reference_time", "speedup"}


def cli(*args, check=True):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"weightdiff {args}: {r.returncode}\n{r.stderr}"
    return r


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """The demo pair, built by the console script, and the CLI's reports on it."""
    root = tmp_path_factory.mktemp("demo")
    cli("demo", "-q", "-o", root / "demo")
    base, ft = root / "demo/pair/base", root / "demo/pair/finetuned"
    out = root / "cli"
    summary = json.loads(cli("compare", base, ft, "-o", out, "--json").stdout)
    return base, ft, out, summary


@pytest.fixture(scope="session")
def comparison(pair):
    base, ft, _, _ = pair
    return weightdiff.compare(base, ft, progress=False)


def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


def test_console_script_prints_the_version():
    r = cli("--version")
    assert r.stdout.strip() == f"weightdiff {weightdiff.__version__}"


def test_console_script_exits_with_the_cli_status():
    r = cli("inspect", "/nonexistent/model", check=False)
    assert r.returncode == 2
    assert "error:" in r.stderr and "/nonexistent/model" in r.stderr


def test_dataframe_numbers_equal_the_cli_json(pair, comparison):
    _, _, out, _ = pair
    wd = json.loads((out / "weight_differences.json").read_text())
    expected = wd["all_differences"]
    df = comparison.to_pandas()
    assert list(df["name"]) == list(expected)
    assert {"module_type", "layer_index"} <= set(df.columns)
    for row in df.to_dict("records"):
        want = expected[row["name"]]
        for key, value in want.items():
            if key in TIMINGS:
                continue
            got = row[key]
            if isinstance(value, list):
                got = list(got)
            assert same(got, value) or (value is None and got is None), (row["name"], key, got, value)
        # Keys absent from a tensor's JSON entry (note, finetuned_shape, …) are empty here.
        for key in set(df.columns) - set(want) - {"name", "module_type", "layer_index"}:
            assert row[key] is None or (isinstance(row[key], float) and math.isnan(row[key]))
    q = df[df["name"] == "model.layers.0.self_attn.q_proj.weight"].iloc[0]
    assert (q["module_type"], q["layer_index"]) == ("q_proj", 0)


def test_arrow_and_polars_hold_the_same_rows(comparison):
    df = comparison.to_pandas()
    t = comparison.to_arrow()
    p = comparison.to_polars()
    assert t.num_rows == p.height == len(df)
    assert t.column("relative_diff").to_pylist() == list(df["relative_diff"])
    assert p["l2_diff"].to_list() == list(df["l2_diff"])


def test_verdict_and_spectra_equal_the_cli(pair, comparison):
    _, _, out, summary = pair
    assert comparison.verdict == summary["verdict"]
    assert comparison.verdict["kind"] == "mixed" and comparison.verdict["rank"] == 4
    analysis = json.loads((out / "lora_analysis.json").read_text())
    assert comparison.verdict == analysis["verdict"]
    assert set(comparison.lora) == set(analysis["tensors"])
    for name, spectrum in analysis["tensors"].items():
        assert comparison.lora[name]["singular_values"] == spectrum["singular_values"], name
    assert comparison.status == "ok" and comparison.complete


def files(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())


def test_save_writes_the_cli_files(pair, comparison, tmp_path):
    _, _, out, _ = pair
    written = comparison.save(tmp_path / "saved")
    assert files(tmp_path / "saved") == files(out)
    reports = [f for f in files(out) if f != ".weightdiff.lock"]
    assert sorted(str(p.relative_to(tmp_path / "saved")) for p in written) == reports
    saved = json.loads((tmp_path / "saved/weight_differences.json").read_text())
    assert saved["modified_layers"] == comparison.modified


def test_notebook_view_has_the_summary_and_the_heatmap(comparison):
    page = comparison._repr_html_()
    assert "mixed" in page and "<iframe" in page and "heatmap" in page.lower()


def test_several_finetunes_give_a_list(pair):
    base, ft, _, _ = pair
    cs = weightdiff.compare(base, [ft, base], lora=False, progress=False)
    assert [len(c.modified) for c in cs] == [8, 0]
    assert cs[0].verdict is None


def test_extract_lora_writes_a_peft_adapter(pair, tmp_path):
    base, ft, _, _ = pair
    a = weightdiff.extract_lora(base, ft, tmp_path / "adapter", rank=4, progress=False)
    cli("extract-lora", base, ft, "-o", tmp_path / "cli-adapter", "--rank", "4", "-q")
    assert files(a.path) == files(tmp_path / "cli-adapter")
    config = json.loads((a.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (a.path / "adapter_model.safetensors").is_file()
    assert a.metadata["options"] and a.metadata == json.loads(
        (tmp_path / "adapter/lora_metadata.json").read_text()
    )
    assert a.summary["modules"] == 4 and a.status == "ok"


def test_inspect_lists_the_tensors_of_the_cli(pair):
    base, _, _, _ = pair
    found = weightdiff.inspect(base, progress=False)
    doc = json.loads(cli("inspect", base, "--json").stdout)
    assert found.tensors == doc["tensors"] and found.structure == doc["structure"]
    assert len(found.to_pandas()) == len(doc["tensors"])
    assert not found.broken


def cli_error(*args):
    r = cli(*args, check=False)
    assert r.returncode == 2
    return r.stderr.strip().removeprefix("error: ")


def test_errors_derive_from_weightdiff_error_and_carry_the_cli_message(pair, tmp_path):
    base, ft, _, _ = pair
    with pytest.raises(weightdiff.ModelError) as e:
        weightdiff.compare(base, tmp_path / "missing", progress=False)
    assert isinstance(e.value, weightdiff.Error)
    assert str(e.value) == cli_error("compare", base, tmp_path / "missing", "-o", tmp_path / "o")
    assert "missing" in str(e.value)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(weightdiff.Error) as e:
        weightdiff.inspect(bad, progress=False)
    assert str(bad) in str(e.value)
    assert str(e.value) == cli_error("inspect", bad)

    with pytest.raises(weightdiff.OptionError, match="regex"):
        weightdiff.compare(base, ft, include="(", progress=False)
    with pytest.raises(weightdiff.Error, match="threshold"):
        weightdiff.compare(base, ft, threshold=-1.0, progress=False)


def big_pair(root: Path):
    """A pair whose comparison takes seconds: 48 full-rank edits of 1024 x 1024 f32."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base, ft = {}, {}
    for layer in range(48):
        w = rng.standard_normal((1024, 1024), dtype=np.float32)
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        base[name] = w
        ft[name] = w + 0.01 * rng.standard_normal((1024, 1024), dtype=np.float32)
    for side, tensors in (("base", base), ("finetuned", ft)):
        (root / side).mkdir()
        save_file(tensors, str(root / side / "model.safetensors"))
    return root / "base", root / "finetuned"


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    yield big_pair(root)
    shutil.rmtree(root)  # 400 MB that pytest would keep for three runs


def test_ctrl_c_stops_a_long_comparison_within_a_second_and_the_gil_is_free(big):
    base, ft = big
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    sent = []

    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(1.0, interrupt)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            weightdiff.compare(base, ft, threads=1, progress=False)
        raised = time.monotonic()
    finally:
        stop.set()
        counter.join()
        timer.cancel()
    assert sent, f"the comparison ended before the interrupt ({time.monotonic() - start:.1f}s)"
    assert raised - sent[0] < 1.0, f"KeyboardInterrupt {raised - sent[0]:.2f}s after SIGINT"
    # Another Python thread ran while the comparison did: the GIL was released.
    assert ticks > 100, ticks


def test_progress_shows_as_tqdm_bars(big, capsys):
    base, ft = big
    weightdiff.compare(base, ft, include=r"layers\.[0-3]\.", threads=1)
    err = capsys.readouterr().err
    assert "diff" in err and "tensors" in err, err


def test_console_script_stops_cleanly_on_sigint_like_the_binary(big, tmp_path):
    base, ft = big
    out = tmp_path / "out"
    p = subprocess.Popen(
        [BIN, "compare", base, ft, "-o", out, "--threads", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 130, err
    assert json.loads((out / "weight_differences.json").read_text())["complete"] is False
    assert "stopped:" in err


def stub_names():
    stub = Path(weightdiff.__file__).with_name("__init__.pyi")
    tree = ast.parse(stub.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def test_the_stub_describes_the_module():
    stubbed = stub_names()
    assert set(weightdiff.__all__) <= set(stubbed), set(weightdiff.__all__) - set(stubbed)
    for name, node in stubbed.items():
        if name == "PathLike":
            continue
        assert hasattr(weightdiff, name), f"{name} is in the stub, not in the module"
        obj = getattr(weightdiff, name)
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in node.args.args + node.args.kwonlyargs]
            assert list(pyinspect.signature(obj).parameters) == params, name
            assert obj.__doc__, f"{name} has no docstring"
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    assert hasattr(obj, member.name), f"{name}.{member.name}"
                elif isinstance(member, ast.AnnAssign):
                    pass  # instance attributes, checked by the tests above
