"""lorafx.compile checks every option's type and range before capturing the model."""
import math

import numpy as np
import pytest
import torch

import lorafx
import lorafx.compiler
from lorafx.meta import LoraRecord, get_record
from lorafx.passes import InsertLoRA, SelectSchedule


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _inputs():
    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture
def no_capture(monkeypatch):
    """Make capture fail loudly: a bad option must be refused before it."""
    def capture(*args, **kwargs):
        raise AssertionError("lorafx.compile captured the model before refusing a bad option")
    monkeypatch.setattr(lorafx.compiler, "capture", capture)


NAN, INF = float("nan"), float("inf")
FIX = ("e.g.", "choose one of", "=True or", "re.escape")  # every message says how to fix it

# (options, exception, substrings the message must contain: the option name and the bad value)
BAD = [
    ({"r": True}, TypeError, ["r must be a positive int", "True", "a bool"]),
    ({"r": 2.0}, TypeError, ["r must be a positive int", "2.0", "a float"]),
    ({"r": "8"}, TypeError, ["r must be a positive int", "'8'", "a string"]),
    ({"r": 0}, ValueError, ["r must be a positive int", "got 0"]),
    ({"r": np.int64(-2)}, ValueError, ["r must be a positive int", "-2"]),
    ({"alpha": NAN}, ValueError, ["alpha must be a finite number > 0", "nan"]),
    ({"alpha": INF}, ValueError, ["alpha", "inf"]),
    ({"alpha": 0}, ValueError, ["alpha", "got 0", "alpha / r", "never change the model"]),
    ({"alpha": -16.0}, ValueError, ["alpha", "-16.0"]),
    ({"alpha": True}, TypeError, ["alpha", "True", "a bool"]),
    ({"alpha": "16"}, TypeError, ["alpha", "'16'", "a string"]),
    ({"target_modules": "q_proj("}, ValueError, ["target_modules='q_proj('", "not a valid regex", "missing )"]),
    ({"target_modules": 3}, TypeError, ["target_modules", "3", "a list of module names"]),
    ({"target_modules": ["0", 2]}, TypeError, ["target_modules", "2"]),
    ({"target_modules": []}, ValueError, ["target_modules is empty"]),
    ({"exclude_modules": "*"}, ValueError, ["exclude_modules='*'", "not a valid regex"]),
    ({"exclude_modules": 5}, TypeError, ["exclude_modules", "5"]),
    ({"rank_pattern": {"q_proj(": 4}}, ValueError, ["rank_pattern key 'q_proj('", "not a valid regex"]),
    ({"rank_pattern": {"(?i)q": 4}}, ValueError, ["rank_pattern key '(?i)q'", "inline flags"]),
    ({"rank_pattern": {"0": True}}, TypeError, ["rank_pattern['0'] must be a positive int", "True"]),
    ({"rank_pattern": {"0": 0}}, ValueError, ["rank_pattern['0'] must be a positive int", "got 0"]),
    ({"rank_pattern": {1: 4}}, TypeError, ["rank_pattern keys must be regex strings", "1"]),
    ({"rank_pattern": [("0", 4)]}, TypeError, ["rank_pattern must be a dict", "[('0', 4)]"]),
    ({"alpha_pattern": {"0": NAN}}, ValueError, ["alpha_pattern['0']", "nan"]),
    ({"alpha_pattern": {"0": 0.0}}, ValueError, ["alpha_pattern['0']", "0.0", "never change the model"]),
    ({"alpha_pattern": {"0)": 4.0}}, ValueError, ["alpha_pattern key '0)'", "not a valid regex"]),
    ({"use_rslora": "false"}, TypeError, ["use_rslora must be True or False", "'false'", "a string"]),
    ({"use_rslora": 1}, TypeError, ["use_rslora must be True or False", "1"]),
    ({"schedule_keep_xa": "False"}, TypeError, ["schedule_keep_xa must be True or False", "'False'", "a string"]),
    ({"fold_a": "yes"}, TypeError, ["fold_a must be True or False", "'yes'", "a string"]),
    ({"fuse_siblings": 0}, TypeError, ["fuse_siblings must be True or False", "0"]),
    ({"dropout": 1.0}, ValueError, ["dropout must be in [0, 1)", "1.0"]),
    ({"dropout": -0.1}, ValueError, ["dropout", "-0.1"]),
    ({"dropout": NAN}, ValueError, ["dropout", "nan"]),
    ({"dropout": True}, TypeError, ["dropout", "True", "a bool"]),
    ({"dropout": "0.1"}, TypeError, ["dropout", "'0.1'", "a string"]),
    ({"init": "xavier"}, ValueError, ["unknown init 'xavier'", "kaiming"]),
    ({"init": None}, ValueError, ["unknown init None"]),
    ({"seed": True}, TypeError, ["seed must be an int or None", "True", "a bool"]),
    ({"seed": 1.5}, TypeError, ["seed", "1.5"]),
    ({"seed": 2**64}, ValueError, ["seed=18446744073709551616", "64 bits"]),
    ({"schedule": "f9b9"}, ValueError, ["schedule='f9b9'", "f1b1"]),
    ({"schedule": "f1b1|0:f2b5"}, ValueError, ["schedule='f1b1|0:f2b5'", "TOKENS:SCHEDULE"]),
    ({"schedule": 5}, TypeError, ["schedule must be 'auto' or a schedule", "5"]),
    ({"schedule_criterion": "vibes"}, ValueError, ["unknown schedule_criterion 'vibes'", "'flops', 'time'"]),
    ({"schedule_criterion": None}, ValueError, ["unknown schedule_criterion None"]),
]


@pytest.mark.parametrize("options, error, parts", BAD, ids=[repr(o) for o, _, _ in BAD])
def test_bad_option_is_refused_before_capture(no_capture, options, error, parts):
    with pytest.raises(error) as info:
        lorafx.compile(_model(), example_inputs=_inputs(), **options)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert any(fix in message for fix in FIX), f"no fix in {message!r}"


def test_unknown_option_is_a_type_error_listing_the_known_ones(no_capture):
    with pytest.raises(TypeError, match=r"unknown option.*'rank'.*known options.*'alpha'"):
        lorafx.compile(_model(), example_inputs=_inputs(), rank=4)


def test_valid_options_still_compile_and_train():
    cm = lorafx.compile(_model(), example_inputs=_inputs(), r=2, alpha=4.0, target_modules=["0", "2"],
                        exclude_modules=None, rank_pattern={"2": 1}, alpha_pattern={"2": 2}, use_rslora=False,
                        dropout=0.0, init="gaussian", seed=0, schedule="auto", schedule_criterion="flops",
                        schedule_keep_xa=False, fold_a=False, fuse_siblings=True)
    x = _inputs()[0]
    before = cm(x).detach()
    assert before.shape == (2, 4)
    params = list(cm.trainable_parameters().values())
    opt = torch.optim.SGD(params, lr=0.1)
    cm(x).square().sum().backward()
    opt.step()
    after = cm(x).detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)  # alpha > 0: training changes it


def test_numpy_scalars_are_accepted_and_normalised():
    cm = lorafx.compile(_model(), example_inputs=_inputs(), r=np.int64(2), alpha=np.float32(4.0),
                        dropout=np.float64(0.0), seed=np.int32(0), rank_pattern={"2": np.int64(1)})
    recs = {rec.site: rec for rec in (get_record(n, LoraRecord) for n in cm.graph_module.graph.nodes) if rec}
    assert {site: (rec.r, rec.scale) for site, rec in recs.items()} == {"0": (2, 2.0), "2": (1, 4.0)}
    assert all(type(rec.r) is int and type(rec.scale) is float for rec in recs.values())
    assert cm(_inputs()[0]).shape == (2, 4)


def test_insert_lora_normalises_its_options():
    p = InsertLoRA(r=np.int64(4), alpha=8, seed=np.int64(3), target_modules=["a"], rank_pattern={"a": np.int32(2)})
    assert (type(p.r), type(p.alpha), type(p.seed), p.target_modules) == (int, float, int, ("a",))
    assert type(p.rank_pattern["a"]) is int
    with pytest.raises(TypeError, match="InsertLoRA: r must be a positive int, got True"):
        InsertLoRA(r=True)


@pytest.mark.parametrize("options, error, part", [
    ({"keep_xa": "False"}, TypeError, "keep_xa must be True or False, got 'False' (a string)"),
    ({"criterion": "vibes"}, ValueError, "unknown criterion 'vibes'"),
    ({"byte_weight": math.nan}, ValueError, "byte_weight must be a finite number >= 0, got nan"),
    ({"byte_weight": "1"}, TypeError, "byte_weight must be a number >= 0, got '1'"),
    ({"token_counts": [0]}, ValueError, "token_counts must be a non-empty list of positive ints"),
    ({"token_counts": []}, ValueError, "token_counts must be a non-empty list"),
    ({"token_counts": ["256"]}, ValueError, "got ('256',)"),
    ({"token_counts": [2.5]}, ValueError, "got (2.5,)"),
    ({"repeats": 0}, ValueError, "repeats must be a positive int"),
    ({"cache_path": 3}, TypeError, "cache_path must be a path"),
])
def test_select_schedule_checks_its_options(options, error, part):
    with pytest.raises(error) as info:
        SelectSchedule(**options)
    assert part in str(info.value)


def test_select_schedule_accepts_any_iterable_of_token_counts():
    assert SelectSchedule(token_counts=(t for t in (256, np.int64(4096)))).token_counts == (256, 4096)
