"""Spec fuzzing: generated specs, valid and hostile, through `clgrid validate`'s path.

Every text either validates (and expands to at most max_trials distinct trials) or fails with
SpecError whose problems are all one-line ``file:line: field.path: message``; nothing else is
raised, nothing takes seconds, nothing allocates much. The suite runs a fixed (derandomized) set of
examples in about a minute; a longer campaign by hand:

    CLGRID_FUZZ_EXAMPLES=20000 /work/venv/bin/python -m pytest tests/test_spec_fuzz.py -q -s
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clgrid import cli
from clgrid import spec as specs
from clgrid.spec import problems as spec_problems
from clgrid.strategies import REGISTRY

EXAMPLES = int(os.environ.get("CLGRID_FUZZ_EXAMPLES", "2000"))
FILENAME = "fuzz.yaml"
SLOW = 10.0  # seconds for one spec: far above the worst bounded input (~1 s), far below a hang
PROBLEM = re.compile(r"(?P<file>.+?):(?P<line>\d+): (?P<path>[^\s:]+): (?P<msg>\S.*)")

# ---- generators ---------------------------------------------------------------------------------

weird_text = st.text(st.characters(codec="utf-8"), max_size=12)  # unicode, controls, line separators
names = st.one_of(st.sampled_from(sorted(REGISTRY)), st.sampled_from(
    ["os.system", "clgrid.strategies.naive.Naive", "__import__('os')", "../naive", "NAIVE", ""]), weird_text)
numbers = st.one_of(st.integers(-3, 3), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 2, 5, 10, 2**32, 2**63]))
scalars = st.one_of(numbers, st.booleans(), st.none(), weird_text, st.sampled_from(["1e3", "yes", "0x1f", "~"]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(weird_text, inner, max_size=3),
                    max_leaves=8)


def maybe(value_strategy, wrong=junk, clean: bool = False):
    """A plausible value (always, for a clean spec), sometimes anything at all."""
    return value_strategy if clean else st.one_of(value_strategy, value_strategy, value_strategy, wrong)


def grid_values(default):
    """Plausible values of a hyperparameter: its default, or an axis of scaled defaults."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return st.just(default)
    scaled = st.sampled_from([1, 2, 3, 10]).map(lambda k: type(default)(default * k) if default else k)
    return st.one_of(st.just(default), st.lists(scaled, min_size=1, max_size=3, unique=True))


@st.composite
def strategy_entry(draw, clean: bool) -> dict:
    name = draw(st.sampled_from(sorted(REGISTRY)) if clean or draw(st.integers(0, 9)) else names)
    entry: dict = {"name": name}
    config = REGISTRY[name].Config.model_fields if name in REGISTRY else {}
    fields = [f for f in config if f != "name"] + ([] if clean else ["lamda", "__class__"])
    for field in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)) if fields else []:
        default = config[field].default if field in config else 1
        if clean:
            entry[field] = draw(grid_values(default))
            continue
        axis = st.lists(st.one_of(st.just(default), numbers), min_size=0, max_size=draw(st.sampled_from([3, 3, 40, 200])))
        entry[field] = draw(st.one_of(st.just(default), axis, junk))
    return entry


@st.composite
def spec_dicts(draw) -> dict:
    clean = draw(st.integers(0, 2)) == 0  # a third are specs a user could write, maybe with one slip
    bench = {"source": draw(maybe(st.sampled_from(["digits", "mnist5k", "cifar10"]), clean=clean)),
             "scenario": draw(maybe(st.sampled_from(["class-il", "task-il", "domain-il"]), clean=clean)),
             "experiences": draw(st.sampled_from([1, 2, 5, 10]) if clean else st.sampled_from([1, 2, 5, 0, -1, 10**6]))}
    extra = ["domain", "class_order", "shuffle_classes", "data_root", "download", "max_rotation", "bogus"]
    for key, value in draw(st.dictionaries(st.sampled_from(extra), junk, max_size=0 if clean else 2)).items():
        bench[key] = value
    data = {"name": draw(maybe(st.sampled_from(["fuzz", "a.b-c_1"]), names, clean)),
            "benchmarks": draw(st.lists(st.just(bench), min_size=1, max_size=1 if clean else 3) | (junk if not clean else st.nothing())),
            "strategies": draw(st.lists(strategy_entry(clean), min_size=1 if clean else 0, max_size=4,
                                        unique_by=lambda e: str(e["name"])) | (junk if not clean else st.nothing())),
            "seeds": draw(maybe(st.lists(st.integers(0, 10**4), min_size=1, max_size=draw(st.sampled_from([2, 2, 300])),
                                         unique=True), st.lists(numbers, max_size=4), clean))}
    optional = {
        "model": st.fixed_dictionaries({"name": maybe(st.sampled_from(["mlp", "cnn", "torch.nn.Linear"]), clean=clean),
                                        "hidden": maybe(st.lists(st.integers(1, 64), min_size=1, max_size=3), clean=clean)}),
        "train": st.fixed_dictionaries({}, optional={"iterations": maybe(st.integers(1, 50), numbers, clean),
                                                     "lr": maybe(st.floats(1e-4, 1.0), numbers, clean),
                                                     "batch_size": maybe(st.integers(1, 256), numbers, clean),
                                                     "optimizer": maybe(st.sampled_from(["sgd", "adam"]), weird_text, clean)}),
        "resources": st.fixed_dictionaries({}, optional={"cpus_per_trial": maybe(st.sampled_from([0.5, 1, 2]), numbers, clean),
                                                         "max_concurrent": maybe(st.integers(1, 8), numbers, clean)}),
        "tracking": st.fixed_dictionaries({}, optional={"experiment": maybe(weird_text.filter(str.isprintable), clean=clean),
                                                        "uri": maybe(weird_text, clean=clean)}),
        "storage": st.fixed_dictionaries({}, optional={"root": maybe(st.sampled_from(["runs", "../../x", "/"]),
                                                                     weird_text, clean)}),
        "max_trials": maybe(st.sampled_from([1, 10, 100, 10_000, 10**6, 10**7, 0, -5]), clean=clean),
        "unsupported": maybe(st.sampled_from(["error", "skip", "skip"]), clean=clean),
        "description": maybe(weird_text, clean=clean),
        **({} if clean else {"extra_key": junk}),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        data[key] = draw(optional[key])
    # One object in two places: safe_dump writes it once with an anchor (&id001), then aliases (*id001).
    if clean:
        data["unsupported"] = draw(st.sampled_from(["error", "skip"]))
        axis = draw(st.lists(st.integers(1, 500), min_size=1, max_size=3, unique=True))
        holders = [e for e in data["strategies"] if "buffer_size" in REGISTRY[e["name"]].Config.model_fields]
        for entry in holders if draw(st.booleans()) else []:
            entry["buffer_size"] = axis
    elif draw(st.integers(0, 3)) == 0:
        shared = draw(st.sampled_from(["benchmarks", "seeds", "strategies"]))
        data["description" if draw(st.booleans()) else "seeds"] = data[shared]
    return data


def render(data: dict, flow: bool, unicode: bool) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=unicode, sort_keys=False)


def billion_laughs(levels: int, fanout: int) -> str:
    lines = ["l0: &l0 [lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


TAGS = ["!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system", "!!binary aGVsbG8=",
        "!!set {{a, b}}", "!!timestamp 2001-02-30", "!!omap [a: 1]", "!custom 1", "!!int 0x_", "!!float 1e99999",
        "!!python/object/new:subprocess.Popen [['touch', '{marker}']]", "!!str", "!!null x", "!!merge 1"]


@st.composite
def texts(draw) -> str:
    """A spec's text: a rendered dict, then maybe one hostile edit."""
    text = render(draw(spec_dicts()), draw(st.booleans()), draw(st.booleans()))
    lines = text.splitlines(keepends=True)
    edit = draw(st.sampled_from(["none", "none", "none", "laughs", "nest", "tag", "lines", "chars", "raw", "anchor"]))
    if edit == "laughs":  # placed under a real field or as a key of its own: refused either way
        bomb = billion_laughs(draw(st.integers(2, 12)), draw(st.integers(1, 12)))
        key = draw(st.sampled_from(["description", "seeds", "zz"]))
        text = bomb + text + f"{key}: *l{bomb.count(chr(10)) - 1}\n"
    elif edit == "nest":
        depth = draw(st.sampled_from([5, 31, 32, 33, 100, 5000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        if opener == "- ":  # block sequences: indentation grows with depth
            body = "".join(" " * (2 * i) + "-\n" for i in range(min(depth, 200)))
            text += "description:\n" + body
        else:
            text += "description: " + opener * depth + "1" + closer * draw(st.sampled_from([depth, 0])) + "\n"
    elif edit == "tag":
        marker = Path(MARKER_DIR.name) / "pwned"
        tag = draw(st.sampled_from(TAGS)).format(marker=marker)
        text += f"{draw(st.sampled_from(['description', 'seeds', 'name']))}: {tag}\n"
    elif edit == "lines" and lines:
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines)))
        op = draw(st.sampled_from(["drop", "dup", "move", "indent"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(j, lines[i])
        elif op == "move":
            lines.insert(j, lines.pop(i))
        else:
            lines[i] = " " * draw(st.integers(1, 5)) + lines[i]
        text = "".join(lines)
    elif edit == "chars":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(st.sampled_from(list(":-[]{}&*!|>'\"%@`#,? \t\n\r\x00\x85\u2028\ufeff")),
                                         max_size=4)) + text[at:]
    elif edit == "raw":
        text = draw(st.text(max_size=200))
    elif edit == "anchor":  # an alias before its anchor, or to an anchor that never comes
        text = "x: *nowhere\n" + text if draw(st.booleans()) else text + "y: &a [*a]\n"
    return text


# ---- the property -------------------------------------------------------------------------------

MARKER_DIR = tempfile.TemporaryDirectory(prefix="clgrid-fuzz-")
SPEC_FILE = Path(MARKER_DIR.name) / FILENAME
SEEN = {"valid": 0, "refused": 0}


def check_problems(problems: list[str], text: str, filename: str) -> None:
    assert problems, "a SpecError without problems"
    n_lines = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text)) + 1  # YAML's line breaks, not only \n
    for problem in problems:
        assert problem.splitlines() == [problem], f"a problem over several lines: {problem!r}"
        m = PROBLEM.fullmatch(problem)
        assert m and m["file"] == filename, f"not file:line: field.path: message: {problem!r}"
        assert 1 <= int(m["line"]) <= n_lines, problem


def validate_file(text: str) -> tuple[int, str, str]:
    """`clgrid validate FILE` in-process: exit code, stdout, stderr."""
    SPEC_FILE.write_text(text, encoding="utf-8", errors="surrogatepass")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["validate", str(SPEC_FILE)])
    return code, out.getvalue(), err.getvalue()


def check_spec_text(text: str) -> None:
    start = time.perf_counter()
    tracemalloc.start()
    try:
        try:
            spec = specs.parse_spec(text, FILENAME)
        except specs.SpecError as exc:
            check_problems(exc.problems, text, FILENAME)
            spec = None
        code, out, err = validate_file(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert elapsed < SLOW, f"{elapsed:.1f}s for a spec of {len(text)} characters"
    assert peak < 200e6, f"{peak / 1e6:.0f} MB for a spec of {len(text)} characters"
    assert not (Path(MARKER_DIR.name) / "pwned").exists(), "a YAML tag ran code"
    if spec is None:
        assert code == 2, (code, out, err)
        check_problems(err.strip().splitlines(), text, str(SPEC_FILE))
        SEEN["refused"] += 1
        return
    assert code == 0 and "valid." in out, (code, out, err)
    trials = specs.expand(spec)
    assert 0 < len(trials) <= spec.max_trials
    assert len({t.trial_key for t in trials}) == len(trials), "two trials with one key would share a folder"
    SEEN["valid"] += 1


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(texts())
def test_generated_specs_validate_or_fail_with_located_problems(text: str) -> None:
    check_spec_text(text)


def test_the_campaign_saw_both_outcomes() -> None:
    """The generator is not degenerate: it reaches valid specs as well as refused ones."""
    if not SEEN["valid"] + SEEN["refused"]:
        pytest.skip("run together with the fuzz test")
    print(f"\nspec fuzz: {SEEN['valid']} valid, {SEEN['refused']} refused")
    assert SEEN["valid"] >= 20 and SEEN["refused"] >= 100, SEEN


# ---- the hostile inputs named in the issue, each on its own -------------------------------------

BASE = "name: x\nbenchmarks: [{source: digits, scenario: class-il, experiences: 2}]\nstrategies: [{name: naive}]\n"


def refused(text: str, limit_s: float = SLOW, limit_bytes: float = 50e6) -> list[str]:
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(specs.SpecError) as err:
            specs.parse_spec(text, "h.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < limit_s and peak < limit_bytes
    check_problems(err.value.problems, text, "h.yaml")
    return err.value.problems


def test_billion_laughs_is_refused_before_expansion() -> None:
    bomb = billion_laughs(10, 10)  # 10^10 values once expanded, 300 characters as text
    (problem,) = refused(bomb + BASE + "description: *l9\n")
    assert "aliases expand this to" in problem and "expected at most 20,000 values" in problem


def test_recursive_alias_and_undefined_alias_are_refused() -> None:
    assert "contains it" in refused(BASE + "seeds: &s [0, *s]\n")[0]
    assert "undefined alias" in refused(BASE + "seeds: *nothing\n")[0]


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_refused_without_recursion_errors(opener: str, closer: str) -> None:
    (problem,) = refused(BASE + "description: " + opener * 20_000 + "1" + closer * 20_000 + "\n")
    assert problem.startswith("h.yaml:4: <yaml>: nested more than 32 levels deep")


def test_oversized_spec_is_refused_by_its_size() -> None:
    (problem,) = refused(BASE + "#" * 300_000 + "\n", limit_s=2)
    assert "the spec is 300,1" in problem and "expected at most 250,000" in problem


def test_duplicate_keys_are_refused_not_silently_overwritten() -> None:
    (problem,) = refused(BASE + "seeds: [0]\nseeds: [1]\n")
    assert problem == "h.yaml:5: <yaml>: key 'seeds' is given twice in this mapping"


def test_python_object_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']", "!!python/name:os.system",
                f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]"):
        (problem,) = refused(BASE + f"description: {tag}\n")
        assert problem.startswith("h.yaml:4: <yaml>: could not determine a constructor for the tag"), problem
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "clgrid.strategies.naive.Naive", "subprocess:call", "../naive"])
def test_strategy_and_model_names_resolve_only_through_the_registries(name: str) -> None:
    problems = refused(BASE.replace("name: naive", f"name: '{name}'") + f"model: {{name: '{name}'}}\n")
    assert problems[0].startswith(f"h.yaml:3: strategies.0.name: unknown strategy '{name}'; valid strategies: ")
    assert problems[1].startswith("h.yaml:4: model.name: Input should be 'mlp', 'cnn' or 'resnet18'")


def test_huge_grid_is_refused_with_its_count_without_expanding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_problems, "strategy_points", lambda grid: pytest.fail("the grid was expanded"))
    axis = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    text = BASE.replace("{name: naive}", f"{{name: ewc, ewc_lambda: {axis}, mode: [separate, online], fisher_samples: {axis}}}")
    (problem,) = refused(text + f"seeds: [{', '.join(str(i) for i in range(1000))}]\n")
    assert "the grid has 2000000000 trials" in problem and "max_trials=10000" in problem


def test_problems_stay_one_line_whatever_the_keys_and_names() -> None:
    text = BASE.replace("name: naive", 'name: "na\\nive\\u2028"') + '"bad\\nkey: x": 1\n'
    problems = refused(text)
    assert any("unknown strategy 'na\\nive\\u2028'" in p for p in problems), problems
    assert any(": bad\\x0akey\\x3a\\x20x: Extra inputs" in p for p in problems), problems


def test_thousands_of_errors_are_listed_up_to_a_cap() -> None:
    problems = refused(BASE + "seeds: [" + ", ".join(["x"] * 5000) + "]\n")
    assert len(problems) == specs.MAX_PROBLEMS + 1
    assert problems[-1] == f"h.yaml:1: <root>: {5000 - specs.MAX_PROBLEMS} more problems not listed (only the first 50 are)"
