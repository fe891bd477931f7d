"""Calibration of the cascade's operating threshold and window (selective.py), and the classification route."""

import pytest
import torch

from lorakit.serve.selective import Window, coverage_at_risk, fit_window, risk_coverage


def synthetic(n=4000, seed=0):
    """Confidences in [0.34, 1] whose chance of being correct rises with the confidence."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.34 + 0.66 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < conf ** 3
    return conf, correct


def test_risk_coverage_by_hand():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, True])
    risk, cov, thr = risk_coverage(conf, correct)
    assert risk.tolist() == [0.0, 0.5, pytest.approx(1 / 3), 0.25]
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0] and thr.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])


@pytest.mark.parametrize("risk", [0.05, 0.1])
def test_threshold_hits_the_target_risk_on_validation(risk):
    conf, correct = synthetic()
    w = fit_window(conf, correct, risk=risk)
    selected = conf >= w.tau
    achieved = 1 - correct[selected].double().mean().item()
    assert abs(achieved - risk) < 0.005  # closest point of a 4,000-sample curve
    cov, r = coverage_at_risk(conf, correct, risk)
    assert r == pytest.approx(achieved) and cov == pytest.approx(selected.double().mean().item())
    # the window: tau inside, 10% of the validation samples either side of it (clamped to [0, 1])
    assert w.low <= w.tau <= w.high
    q = (conf <= w.tau).double().mean().item()
    expected = min(q + 0.1, 1) - max(q - 0.1, 0)
    assert w.inside(conf).double().mean().item() == pytest.approx(expected, abs=0.002)
    assert (conf < w.low).double().mean().item() == pytest.approx(max(q - 0.1, 0), abs=0.002)


def test_window_clamps_at_the_ends():
    conf, correct = synthetic()
    w = fit_window(conf, torch.ones_like(correct), risk=0.05)  # never wrong: tau is the lowest confidence
    assert w.low == pytest.approx(conf.min().item()) and w.inside(conf).double().mean().item() == pytest.approx(0.1, abs=0.002)


def test_refuses_bad_settings():
    conf, correct = synthetic(100)
    with pytest.raises(ValueError, match="risk must be"):
        fit_window(conf, correct, risk=0.0)
    with pytest.raises(ValueError, match="low"):
        Window(tau=0.5, low=0.6, high=0.4)
    with pytest.raises(ValueError, match="matching"):
        risk_coverage(conf, correct[:5])


def test_cascade_calibrate_uses_member_zero_on_validation():
    from test_cascade import TEXTS, member

    from lorakit import zoo
    from lorakit.serve.cascade import AdapterCascade
    from lorakit.serve.selective import msp

    base, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    cascade = AdapterCascade(base, [member(0), member(1)])
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        probs = cascade.models[0](**batch).logits.double().softmax(-1)
    labels = probs.argmax(-1).clone()
    labels[:4] = (labels[:4] + 1) % 3  # 4 of 16 wrong
    w = cascade.calibrate([{**batch, "labels": labels}], risk=0.1)
    expected = fit_window(msp(probs), probs.argmax(-1) == labels, risk=0.1)
    assert w == expected and cascade.window == w


def test_classification_route(tmp_path):
    from fastapi.testclient import TestClient
    from serve_helpers import load_model
    from test_cascade import member

    import lorakit
    from lorakit import zoo
    from lorakit.serve import Engine, EngineConfig
    from lorakit.serve.cascade import AdapterCascade
    from lorakit.serve.server import build_app

    base, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    cascade = AdapterCascade(base, [member(0), member(1)], Window(tau=0.5, low=0.0, high=1.0), tok,
                             label_names=["neg", "neu", "pos"])
    model, btok = load_model("tiny-llama")
    engine = Engine(model, btok, EngineConfig(max_batch=2, max_len=64, pool_bytes=1 << 20))
    client = TestClient(build_app(engine, "base", classifiers={"sentiment": cascade}))
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "sentiment" in ids
    r = client.post("/v1/classifications", json={"model": "sentiment", "input": ["good", "bad"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["stages"] for d in body["data"]] == [2, 2] and body["usage"]["member_forwards"] == 4
    assert client.post("/v1/classifications", json={"model": "nope", "input": "x"}).status_code == 404
    assert client.post("/v1/classifications", json={"model": "sentiment", "input": []}).status_code == 400
    assert lorakit  # the package import registers the methods the members use


def test_serve_refuses_a_bad_cascade_option_in_one_line(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["serve", "--model", "tiny-llama", "--cascade", "no-equals-sign"]) == 2
    assert "expected NAME=SPEC.json" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-llama", "--cascade", f"x={tmp_path / 'missing.json'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file" in err
