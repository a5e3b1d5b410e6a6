"""Recipe search (--method auto) on a tiny model: chosen on held-apart calibration text, recorded, reloadable."""
import json

import pytest
import torch

import lrinfer
from lrinfer.cli import main
from lrinfer.offline.recipe import Recipe

TEXT = ("A stitch in time saves nine. Actions speak louder than words. " * 3 +
        "The early bird catches the worm; the second mouse gets the cheese. ") * 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_hf_dir):
    return tiny_hf_dir(tmp_path_factory.mktemp("model_dir"), TEXT, layers=4)


def test_search_picks_lowest_heldout_and_composes(make_tiny):
    dense = make_tiny(layers=4)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    cands = [Recipe("svd"), Recipe("svdllm"), Recipe("saes", "last", "drank", selection_options={"k": 3})]
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    res = lrinfer.search_recipes(dense, lrinfer.CompressConfig(ratio=0.2, batch_size=4), calib, held, cands,
                                 progress=False, screening=None)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())   # dense left alone
    scores = [t["heldout_ppl"] for t in res.trials]
    assert res.best == cands[scores.index(min(scores))]
    # the third recipe composes all three stages: only the last 3 blocks, D-Rank ranks, SAES factors
    # (rank_multiple 1: at this tiny width the default multiple of 16 rounds D-Rank's spread away)
    composed = lrinfer.compress(make_tiny(layers=4),
                                cands[2].config(lrinfer.CompressConfig(ratio=0.2, batch_size=4, rank_multiple=1)),
                                calib, progress=False)
    assert {n.split(".")[2] for n in composed.ranks} == {"1", "2", "3"}
    assert len({r[0] for n, r in composed.ranks.items() if n.endswith("q_proj")}) > 1   # non-uniform


def test_cli_auto_records_choice_and_reloads(model_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["compress", "--model", str(model_dir / "model"), "--method", "auto", "--ratio", "0.2",
            "--calib", str(model_dir / "text.txt"), "--samples", "4", "--calib-seq-len", "32", "--heldout", "3",
            "--batch-size", "4", "--out", str(out), "--no-eval", "--no-progress", "--json"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    search = report["recipe_search"]
    n = len(lrinfer.default_candidates(0.2))
    screen = [t for t in search["trials"] if t["round"] == "screen"]
    full = [t for t in search["trials"] if t["round"] == "full"]
    assert len(screen) == n and len(full) in (1, 2) and "held-apart calibration" in search["criterion"]
    assert "screened first on 4 calibration samples" in search["criterion"]
    # the best proxy (and a second when tied) went on to the full round (refined; proxies are not), which decided
    ranked = [t["label"].removesuffix(" / 4 samples") for t in sorted(screen, key=lambda t: t["heldout_ppl"])]
    assert [t["label"].removesuffix(" / blockfit") for t in full] == ranked[:len(full)]
    best = min(full, key=lambda t: t["heldout_ppl"])
    assert search["chosen_label"] == best["label"] and report["method"] == best["recipe"]["method"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["recipe_search"]["chosen"] == best["label"]
    assert qc["config"]["selection"] == best["recipe"]["selection"]
    model, _ = lrinfer.load_checkpoint(out)
    assert len(lrinfer.runtime.nn.lowrank_modules(model)) == len(report["ranks"])


def test_search_never_reads_evaluation_data(model_dir, tmp_path, monkeypatch, capsys):
    import lrinfer.data as data
    real_load = data.load_text

    def calibration_only(source, purpose, data_dir=None):
        if purpose != "calib":
            raise AssertionError(f"the search read evaluation data ({source}, {purpose})")
        return real_load(source, purpose, data_dir)
    monkeypatch.setattr(data, "load_text", calibration_only)
    monkeypatch.setattr(data, "eval_windows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("eval read")))
    empty = tmp_path / "no-data"          # no WikiText-2 test split anywhere it could look
    empty.mkdir()
    monkeypatch.setenv("LRINFER_DATA_DIR", str(empty))
    assert main(["compress", "--model", str(model_dir / "model"), "--method", "auto", "--ratio", "0.2",
                 "--calib", str(model_dir / "text.txt"), "--samples", "4", "--calib-seq-len", "32",
                 "--heldout", "2", "--batch-size", "4", "--out", str(tmp_path / "o"), "--no-eval",
                 "--no-progress", "--data-dir", str(empty)]) == 0


def test_selection_keeps_costly_first_layers_dense(make_tiny):
    """First two blocks full-rank (costly to cut), last two exactly low-rank (free to cut):
    the held-apart criterion must prefer compressing only the last layers."""
    torch.manual_seed(0)
    dense = make_tiny(layers=4)
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                out_f, in_f = lin.weight.shape
                if i >= 2:   # rank 4: any rank >= 4 reproduces it exactly
                    lin.weight.copy_(torch.randn(out_f, 4) @ torch.randn(4, in_f) / in_f ** 0.5)
                else:        # flat spectrum, large: every dropped direction costs
                    lin.weight.copy_(torch.linalg.qr(torch.randn(max(out_f, in_f), max(out_f, in_f)))[0][:out_f, :in_f])
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    cands = [Recipe("svdllm"), Recipe("svdllm", "last", selection_options={"k": 2})]
    res = lrinfer.search_recipes(dense, lrinfer.CompressConfig(ratio=0.2, batch_size=4, rank_multiple=1), calib,
                                 held, cands, progress=False)
    assert res.best == cands[1], res.trials
    assert all(n.split(".")[2] in ("2", "3") for n in res.result.ranks)


def test_screening_keeps_the_best_proxies_and_shares_them(make_tiny, tmp_path, monkeypatch):
    import lrinfer.offline.recipe as recipe_mod
    dense = make_tiny(layers=2)
    g = torch.Generator().manual_seed(2)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    base = lrinfer.CompressConfig(ratio=0.3, batch_size=4)
    cands = [Recipe("svd"), Recipe("svdllm"), Recipe("svdllm", refinement="blockfit", refinement_options={"steps": 2}),
             Recipe("svdllm", "last", selection_options={"k": 1})]
    runs = []
    real = recipe_mod.compress
    monkeypatch.setattr(recipe_mod, "compress", lambda m, cfg, ids, *x, **k: runs.append(
        (cfg.refinement, ids.shape[0])) or real(m, cfg, ids, *x, **k))
    res = lrinfer.search_recipes(dense, base, calib, held, cands, work_dir=tmp_path, progress=False,
                                 screening=recipe_mod.Screening(samples=4, keep=1, keep_max=1))
    screen = [t for t in res.trials if t["round"] == "screen"]
    full = [t for t in res.trials if t["round"] == "full"]
    assert len(screen) == 3 and runs[:3] == [("none", 4)] * 3     # svdllm and svdllm~blockfit share one proxy
    best_proxy = min(screen, key=lambda t: t["heldout_ppl"])["label"].removesuffix(" / 4 samples")
    assert {t["label"].split(" / blockfit")[0] for t in full} == {best_proxy}
    assert res.best.label == min(full, key=lambda t: t["heldout_ppl"])["label"]
    assert all("refinement" not in t for t in screen)
    runs.clear()   # resumed: nothing runs again, the same choice
    again = lrinfer.search_recipes(dense, base, calib, held, cands, work_dir=tmp_path, resume=True, progress=False,
                                   screening=recipe_mod.Screening(samples=4, keep=1, keep_max=1))
    assert runs == [] and again.best == res.best


def test_a_refined_trial_reports_its_refinement(make_tiny):
    dense = make_tiny(layers=2)
    g = torch.Generator().manual_seed(3)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    res = lrinfer.search_recipes(dense, lrinfer.CompressConfig(ratio=0.3, batch_size=4), calib, held,
                                 [Recipe.parse("svdllm~blockfit:steps=4,lr=0.003")], progress=False, screening=None)
    (t,) = res.trials
    r = t["refinement"]   # mean block output error before -> after, and what refining cost
    assert r["blocks"] == 2 and r["error_after"] < r["error_before"] and 0 < r["seconds"] <= t["seconds"] + 0.05


def test_recipe_spec_parses_every_stage():
    r = Recipe.parse("saes:beta_min=0,beta_max=0.9+drank@last:cap=0.3%128")
    assert r == Recipe("saes", "last", "drank", {"beta_min": 0, "beta_max": 0.9}, {"cap": 0.3}, {}, 128)
    assert r.label == "saes(beta_max=0.9,beta_min=0) / last(cap=0.3) / drank / 128 samples"
    assert Recipe.parse("ressvd") == Recipe("ressvd", "last")        # the solver's own selection
    assert Recipe.parse("svdllm+drank") == Recipe("svdllm", allocation="drank")
    cfg = Recipe.parse("saes@last:k=3%16").config(lrinfer.CompressConfig(ratio=0.2))
    assert (cfg.selection, cfg.selection_options, cfg.n_samples) == ("last", {"k": 3}, 16)
    # ints and strings as well as floats, checked against the options' types before any work
    cfg = Recipe.parse("ressvd:mode=same_metric,beta=0.1@last:k=3").config(lrinfer.CompressConfig(ratio=0.2))
    assert cfg.method_options == {"mode": "same_metric", "beta": 0.1} and cfg.selection_options == {"k": 3}
    assert Recipe.parse("fwsvd:axis=in").config(lrinfer.CompressConfig(ratio=0.2)).method_options == {"axis": "in"}
    assert Recipe.parse("saes:beta=null").config(lrinfer.CompressConfig(ratio=0.2)).method_options == {"beta": None}
    for bad, says in [("", "names no solver"), ("+drank", "names no solver"), ("saes@last:cap", "KEY=VALUE"),
                      ("saes@last:cap=", "KEY=VALUE"), ("saes%0", "positive integer"), ("nosuch", "nosuch")]:
        with pytest.raises(lrinfer.LrinferError, match=says):
            Recipe.parse(bad)
    for bad, says in [("saes:betamax=0.9", "no option.*betamax"), ("saes:beta=high", "beta='high' is not a float or None"),
                      ("ressvd:mode=bogus", "mode='bogus' is not one of 'whiten_then_plain'"),
                      ("ressvd@last:k=2.5", "k=2.5 is not an int or None"), ("svdllm+drank:fallback=1", "a bool")]:
        with pytest.raises(lrinfer.LrinferError, match=says):   # caught when the config is built, before any work
            Recipe.parse(bad).config(lrinfer.CompressConfig(ratio=0.2))


def test_search_resumes_by_recipe_and_slices_calibration(make_tiny, tmp_path, monkeypatch):
    import lrinfer.offline.recipe as recipe_mod
    dense = make_tiny(layers=2)
    g = torch.Generator().manual_seed(1)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    base = lrinfer.CompressConfig(ratio=0.3, batch_size=4)
    a, b, c = Recipe("svd"), Recipe("svdllm"), Recipe("svdllm", samples=3)
    first = lrinfer.search_recipes(dense, base, calib, held, [a, b], work_dir=tmp_path, progress=False,
                                   screening=None)
    rows = []
    real = recipe_mod.compress
    monkeypatch.setattr(recipe_mod, "compress", lambda m, cfg, ids, *x, **k: rows.append(ids.shape[0]) or
                        real(m, cfg, ids, *x, **k))
    # a new order and a new candidate: the finished ones are found by recipe, only c runs
    again = lrinfer.search_recipes(dense, base, calib, held, [c, b, a], work_dir=tmp_path, resume=True,
                                   progress=False, screening=None)
    assert rows == [3]                                      # c alone ran, on its first 3 samples
    by_label = {t["label"]: t for t in first.trials}
    assert [again.trials[i]["heldout_ppl"] for i in (1, 2)] == [by_label[b.label]["heldout_ppl"],
                                                                by_label[a.label]["heldout_ppl"]]
    if again.best != c:      # a winner from the first run is reloaded from its own factors
        assert again.best == first.best
        for n, p in first.result.factors.items():
            assert torch.equal(again.result.factors[n].U, p.U)
    with pytest.raises(lrinfer.LrinferError, match="asks for 9 calibration samples"):
        lrinfer.search_recipes(dense, base, calib, held, [Recipe("svd", samples=9)], progress=False)
    with pytest.raises(lrinfer.LrinferError, match="repeat"):
        lrinfer.search_recipes(dense, base, calib, held, [a, Recipe("svd")], progress=False)


def test_cli_auto_takes_candidates(model_dir, tmp_path, capsys):
    out = tmp_path / "auto2"
    common = ["compress", "--model", str(model_dir / "model"), "--ratio", "0.2", "--calib",
              str(model_dir / "text.txt"), "--samples", "4", "--calib-seq-len", "32", "--heldout", "2",
              "--batch-size", "4", "--out", str(out), "--no-eval", "--no-progress"]
    assert main(common + ["--candidates", "svdllm"]) == 2          # without --method auto
    assert "--method auto" in capsys.readouterr().err
    assert main(common + ["--method", "auto", "--candidates", "svdllm%2", "saes:beta_max=0.5@last:k=2"]) == 0
    search = json.loads((out / "report.json").read_text())["recipe_search"]
    screen = [t["label"] for t in search["trials"] if t["round"] == "screen"]   # more candidates than kept
    assert screen == ["svdllm / all / uniform / 2 samples", "saes(beta_max=0.5) / last(k=2) / uniform / 4 samples"]
    full = [t for t in search["trials"] if t["round"] == "full"]   # 2 held-apart windows: tied, both go on
    assert 1 <= len(full) <= 2
    assert search["chosen_label"] == min(full, key=lambda t: t["heldout_ppl"])["label"]
    assert search["chosen_label"] in ("svdllm / all / uniform / 2 samples", "saes(beta_max=0.5) / last(k=2) / uniform")
    assert all("window_nll" not in t for t in search["trials"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["recipe_search"]["chosen"] == search["chosen_label"]
    assert qc["config"]["n_samples"] == (2 if search["chosen_label"].startswith("svdllm") else 4)


def test_cli_screen_sets_the_screening_round(model_dir, tmp_path, capsys):
    common = ["compress", "--model", str(model_dir / "model"), "--ratio", "0.2", "--calib",
              str(model_dir / "text.txt"), "--samples", "4", "--calib-seq-len", "32", "--heldout", "2",
              "--batch-size", "4", "--no-eval", "--no-progress"]
    cands = ["--candidates", "svd", "svdllm", "svdllm@last:k=1"]
    for bad, says in [(["--screen", "2", "1"], "add --method auto"),
                      (["--method", "auto", "--screen", "0", "1"], "SAMPLES and KEEP must be >= 1")]:
        assert main(common + ["--out", str(tmp_path / "bad")] + cands + bad) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()           # refused before any work
    for screen, n_screen, n_full in [(["2", "2"], 3, 2), (["0", "0"], 0, 3)]:
        out = tmp_path / f"s{screen[0]}"
        assert main(common + ["--out", str(out), "--method", "auto", "--screen", *screen] + cands) == 0
        trials = json.loads((out / "report.json").read_text())["recipe_search"]["trials"]
        assert [t["round"] for t in trials].count("screen") == n_screen
        assert [t["round"] for t in trials].count("full") == n_full
        assert all(t["label"].endswith("/ 2 samples") for t in trials if t["round"] == "screen")


def test_screening_keeps_a_tied_second_finalist():
    import lrinfer.offline.recipe as recipe_mod
    """Paired per-window NLL decides ties: a proxy 0.1 NLL per window behind with noise of 1 is tied
    (goes on); one 5 behind with the same noise is not; never more than keep_max."""
    g = torch.Generator().manual_seed(0)
    base = 100 + torch.randn(32, generator=g, dtype=torch.float64)

    def trial(label, shift, noise):
        nll = base + shift + noise * torch.randn(32, generator=g, dtype=torch.float64)
        return {"label": label, "heldout_ppl": float(nll.mean()), "window_nll": nll.tolist()}

    best = {"label": "best", "heldout_ppl": float(base.mean()), "window_nll": base.tolist()}
    scr = recipe_mod.Screening()
    tied, far, also_tied = trial("tied", 0.1, 1.0), trial("far", 5.0, 1.0), trial("also", 0.05, 1.0)
    assert [t["label"] for t in scr.finalists([far, tied, best])] == ["best", "tied"]
    assert [t["label"] for t in scr.finalists([far, best])] == ["best"]
    assert len(scr.finalists([best, tied, also_tied])) == 2                     # keep_max
    assert len(recipe_mod.Screening(keep_max=3).finalists([best, tied, also_tied])) == 3
    assert [t["label"] for t in recipe_mod.Screening(tie_z=0).finalists([tied, best])] == ["best"]
