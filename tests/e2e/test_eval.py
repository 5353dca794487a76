"""`pag eval` on tiny through the real CLI: every text method, report/results/rewrites/grid contents,
the cache on re-run, resume after an interrupt, exit 2 on a bad method. CPU, --limit 2, 4 rewrites."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
N_REWRITES, LIMIT = 4, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding an SFT-like policy dir and a training run with a checkpoint (tiny, random weights:
    training takes minutes; what is tested here is that a run's checkpoint is loaded and evaluated)."""
    from common.config import load_config
    from common.models import build_policy, build_tokenizer
    from learner.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("eval")
    cfg = load_config("tiny")
    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok)
    policy.save_pretrained(path / "sft")
    tok.save_pretrained(path / "sft")
    cfg.run.name = "trained"
    cfg.save(path / "runs" / "trained" / "config.yaml")
    flow = torch.nn.Linear(2, 2)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy different from the SFT one, so its rewrites differ
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path / "runs" / "trained", 3, policy, tok, flow, torch.optim.AdamW(flow.parameters()), {})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return path, env


def pag(args, workdir, timeout=300):
    path, env = workdir
    return subprocess.run([sys.executable, "-m", "pag.cli", "eval", *args], cwd=path, env=env,
                          capture_output=True, text=True, timeout=timeout)


ARGS = ["--limit", str(LIMIT), "--rewrites", str(N_REWRITES), "--decode", "sample", "--datasets", "lexica,chatgpt",
        "--no-progress"]


def test_eval_every_method_then_cache_hit(workdir):
    path, _ = workdir
    methods = f"plain,rule,sft:{path / 'sft'},pag:runs/trained"
    first = pag(["--methods", methods, "--name", "a", *ARGS], workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    out = path / "runs" / "eval-a"
    results = json.loads((out / "results.json").read_text())
    assert results["sets"] == {"lexica": LIMIT, "chatgpt": LIMIT}
    assert set(results["table"]) == {"plain", "rule", "sft", "pag"}
    for label, per_set in results["table"].items():
        for set_name, cell in per_set.items():
            assert cell["reward"]["n"] == LIMIT
            for key in ("reward", "aes_gain", "rel", "text_diversity", "image_diversity"):
                assert math_finite(cell[key]["mean"]), (label, set_name, key)
    plain = results["table"]["plain"]["lexica"]
    assert plain["aes_gain"]["mean"] == 0.0 and plain["text_diversity"]["mean"] == 0.0  # by construction
    assert results["table"]["sft"]["lexica"]["text_diversity"]["mean"] > 0
    assert "all-MiniLM-L6-v2" in results["text_encoder"]
    rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * LIMIT * (1 + 1 + N_REWRITES + N_REWRITES)
    assert all("error" not in r and "reward" in r for r in rows)
    rule = [r for r in rows if r["method"] == "rule"]
    assert all(r["text"].startswith(r["prompt"]) and r["text"].endswith("8k") for r in rule)
    report = (out / "report.md").read_text()
    assert "## Results (mean ± 95 % CI over prompts)" in report and "all-MiniLM-L6-v2" in report
    for label in ("plain", "rule", "sft", "pag"):
        assert f"| {label} | lexica |" in report and f"| {label} | chatgpt |" in report
    from PIL import Image

    with Image.open(out / "grid_lexica.png") as grid:  # plain-prompt row + rule, sft, pag; LIMIT columns
        assert grid.size == (LIMIT * 128, 4 * (128 + 18))
    assert (out / "scatter.png").stat().st_size > 0
    assert "0 from the cache" in first.stdout

    again = pag(["--methods", methods, "--name", "b", *ARGS], workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 texts rendered" in again.stdout
    second = json.loads((path / "runs" / "eval-b" / "results.json").read_text())
    assert second["table"] == results["table"]
    assert second["stats"]["rendered"] == 0 and second["stats"]["cache_hits"] == results["stats"]["items"]


def test_official_baseline_is_the_policy_input_for_every_method(workdir):
    """reward.baseline=policy_input (sd14's default; eval.py:154-215 renders the plain row, `manual=True`, from the
    policy input): the plain method's text is "x Rephrase:\n" (gain 0), and the rule's rewrite is scored against
    that baseline, not against the x-only one of tiny's default."""
    path, _ = workdir
    args = ["--limit", "1", "--datasets", "lexica", "--no-progress", "--methods", "plain,rule"]
    runs = {b: pag([*args, "--name", f"base-{b}", f"reward.baseline={b}"], workdir) for b in ("policy_input", "plain")}
    rows = {}
    for b, run in runs.items():
        assert run.returncode == 0, run.stderr[-3000:]
        rows[b] = {r["method"]: r for r in map(json.loads, (path / "runs" / f"eval-base-{b}" / "rewrites.jsonl")
                                               .read_text().splitlines())}
    official, ours = rows["policy_input"], rows["plain"]
    assert official["plain"]["text"] == official["plain"]["prompt"] + " Rephrase:\n"
    assert official["plain"]["aes_gain"] == 0
    assert ours["plain"]["text"] == ours["plain"]["prompt"]
    assert official["rule"]["text"] == ours["rule"]["text"]
    # the same rewrite, the same pictures (rendered in other batches: equal to float noise)
    assert official["rule"]["aes"] == pytest.approx(ours["rule"]["aes"], abs=1e-4)
    assert official["rule"]["aes_gain"] != ours["rule"]["aes_gain"], "measured against another baseline"


def math_finite(x) -> bool:
    return x == x and abs(x) != float("inf")


def test_bad_method_exits_2_naming_it(workdir):
    result = pag(["--methods", "plain,pag:runs/missing", *ARGS], workdir)
    assert result.returncode == 2
    assert "pag:runs/missing" in result.stderr and "does not exist" in result.stderr


def test_resume_after_interrupt_renders_only_the_rest(tmp_path):
    """A pool interrupted after its first batch leaves that batch in the cache; the next run renders the rest."""
    from common.config import load_config
    from eval.cache import ResultsCache
    from eval.methods import MethodOutput, Rewrite
    from eval.pool import LocalPool
    from eval.runner import render_missing, work_items

    cfg = load_config("tiny", overrides=["eval.batch_size=2", "eval.images.steps=2"])
    sets = {"s": ["a red car", "a blue boat", "a green tree"]}
    outputs = {"rule": {"s": [MethodOutput(p, [Rewrite(p + ", 8k")]) for p in sets["s"]]}}
    items = work_items(cfg, sets, outputs)
    assert len(items) == 6
    pool = LocalPool(cfg)

    class Interrupted:
        size = 1

        def map(self, works):
            yield from pool.map(works[:1])
            raise KeyboardInterrupt

    cache = ResultsCache(tmp_path / "c.sqlite")
    with pytest.raises(KeyboardInterrupt):
        render_missing(cfg, items, cache, Interrupted(), pool.render_id(), progress=False)
    assert cache.count() == 2
    records, errors, stats = render_missing(cfg, items, cache, pool, pool.render_id(), progress=False)
    assert (stats["cache_hits"], stats["rendered"], len(records), errors) == (2, 4, 6, {})
    records2, _, stats2 = render_missing(cfg, items, cache, pool, pool.render_id(), progress=False)
    assert stats2["rendered"] == 0
    key = ("a red car", "a red car, 8k")
    assert records2[key]["aes"] == pytest.approx(records[key]["aes"], abs=1e-6)


@pytest.mark.ray
def test_ray_pool_of_two_workers_matches_the_local_worker(ray_local):
    """Fan-out over 2 Ray actors: every batch answered once, the same numbers as in-process."""
    from common.config import load_config
    from eval.pool import LocalPool, RayPool
    from eval.worker import decode_results, encode_items

    cfg = load_config("tiny", overrides=["eval.images.steps=2"])
    items = [{"against": "a red car", "key": t, "text": t, "thumb": False}
             for t in ("a red car", "a red car, 8k", "a red car, oil painting", "a red car at night")]
    works = [encode_items(items[i:i + 1]) for i in range(len(items))]
    pool = RayPool(cfg, 2, torch_threads=1)
    try:
        remote = {r["key"]: r for blob in pool.map(works) for r in decode_results(blob)}
        assert pool.render_id() == LocalPool(cfg).render_id()
    finally:
        pool.close()
    local = {r["key"]: r for blob in LocalPool(cfg).map(works) for r in decode_results(blob)}
    from eval.cache import decode_record

    assert sorted(remote) == sorted(local) and all(r["error"] is None for r in remote.values())
    for key in local:
        a, b = decode_record(remote[key]["record"]), decode_record(local[key]["record"])
        assert a["aes"] == pytest.approx(b["aes"], abs=1e-4) and a["clip"] == pytest.approx(b["clip"], abs=1e-4)


def test_beam_decoding_is_deterministic_and_ranked(workdir):
    from common.config import load_config
    from eval.methods.policy import PolicyMethod

    path, _ = workdir
    cfg = load_config("tiny", overrides=["eval.decode=beam", "eval.max_new_tokens=6", "eval.min_new_tokens=2"])
    method = PolicyMethod("sft", str(path / "sft"), cfg.model, cfg.eval)
    first = method.rewrite(["a red car", "a blue boat"], 3)
    again = method.rewrite(["a red car", "a blue boat"], 3)
    assert [[r.text for r in o.rewrites] for o in first] == [[r.text for r in o.rewrites] for o in again]
    assert all(len(o.rewrites) == 3 for o in first)
    # ranked: the search's own sequence scores, best first (the search returns them in group order)
    from common.beam_search import diverse_beam_search

    ev = cfg.eval
    ids, mask = method.rewriter.encode(["a red car", "a blue boat"])
    out_ids, out_mask, scores = diverse_beam_search(
        method.model, ids, mask, num_groups=3, beams_per_group=ev.beams_per_group,
        diversity_penalty=ev.diversity_penalty, length_penalty=ev.length_penalty, min_new_tokens=2,
        max_new_tokens=6, eos_id=method.tokenizer.eos_token_id)
    for b, (out, prompt) in enumerate(zip(first, ["a red car", "a blue boat"])):
        best_first = sorted(range(3), key=lambda r: -float(scores[b, r]))
        texts = method.rewriter.texts(out_ids[b, best_first], out_mask[b, best_first])
        assert [r.text for r in out.rewrites] == [method.fmt.rewrite(prompt, t) for t in texts]


def test_sampled_rewrites_depend_on_the_prompt_and_seed_only(workdir):
    """Whatever else is in the batch (or was cached before), a prompt gets the same sampled rewrites."""
    from common.config import load_config
    from eval.methods.policy import PolicyMethod

    path, _ = workdir
    cfg = load_config("tiny", overrides=["eval.decode=sample", "eval.max_new_tokens=6", "eval.min_new_tokens=2"])
    method = PolicyMethod("sft", str(path / "sft"), cfg.model, cfg.eval)
    texts = lambda outs: [[r.text for r in o.rewrites] for o in outs]  # noqa: E731
    both = texts(method.rewrite(["a red car", "a blue boat"], 3))
    assert texts(method.rewrite(["a blue boat"], 3)) == both[1:]
    assert texts(method.rewrite(["a green bike", "a red car"], 3))[1] == both[0]
    other = load_config("tiny", overrides=["eval.decode=sample", "eval.max_new_tokens=6", "eval.min_new_tokens=2",
                                           "eval.images.seed=7"])
    assert texts(PolicyMethod("sft", str(path / "sft"), other.model, other.eval).rewrite(["a red car"], 3)) != both[:1]


def test_suffix_run_is_evaluated_in_its_own_format(workdir, tmp_path):
    """A `sampler.response=suffix`, `model.input_format=promptist` run: the policy reads
    "x Rephrase: x," and every rewrite is "x, continuation" (common/formats.py), not the raw continuation."""
    import yaml

    from common.config import load_config
    from eval.methods import build_method
    from eval.spec import parse_methods

    path, _ = workdir
    run = tmp_path / "runs" / "suffix"
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(path / "runs" / "trained" / "checkpoints", target_is_directory=True)
    saved = yaml.safe_load((path / "runs" / "trained" / "config.yaml").read_text())
    saved["model"]["input_format"], saved["sampler"]["response"] = "promptist", "suffix"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config("tiny", overrides=["eval.decode=sample", "eval.max_new_tokens=4", "eval.min_new_tokens=2"])
    (spec,) = parse_methods(f"pag:{run}")
    method = build_method(spec, cfg)
    ids, _ = method.rewriter.encode(["a red car."])
    assert method.tokenizer.decode(ids[0]) == "a red car. Rephrase: a red car,"
    outs = method.rewrite(["a red car.", "a blue boat"], 2)
    for out, stem in zip(outs, ["a red car, ", "a blue boat, "]):
        assert len(out.rewrites) == 2 and all(r.text.startswith(stem) for r in out.rewrites), out.rewrites
    plain = build_method(parse_methods(f"pag:{path / 'runs' / 'trained'}")[0], cfg)  # a full run: unchanged
    assert plain.tokenizer.decode(plain.rewriter.encode(["a red car."])[0][0]) == "a red car. Rephrase:\n"


def test_promptist_method_uses_its_template_and_the_packaged_tokenizer(tmp_path):
    from common.config import load_config
    from common.models import build_policy, build_tokenizer
    from eval.methods import build_method
    from eval.spec import parse_methods

    cfg = load_config("tiny", overrides=["eval.decode=sample", "eval.max_new_tokens=5", "eval.min_new_tokens=2"])
    build_policy(cfg.model, build_tokenizer(cfg.model)).save_pretrained(tmp_path / "promptist")  # no tokenizer files
    (spec,) = parse_methods(f"promptist:{tmp_path / 'promptist'}")
    method = build_method(spec, cfg)
    assert method.template == "{prompt} Rephrase:"
    ids, _ = method.rewriter.encode(["a red car"])
    assert method.tokenizer.decode(ids[0]) == "a red car Rephrase:"
    (out,) = method.rewrite(["a red car"], 2)
    assert len(out.rewrites) == 2


def test_extra_scorer_judges_against_the_plain_prompt_or_the_rewrite():
    from scoring.scorers import SCORE_KEYS, SCORERS, register_scorer
    from common.config import load_config
    from eval.cache import decode_record
    from eval.worker import EvalWorker, decode_results, encode_items

    @register_scorer("textlen")
    def textlen(ctx):  # a scorer that reports the length of the text it judges against
        return lambda images, prompts: {"textlen": torch.tensor([float(len(p)) for p in prompts])}

    item = {"against": "a red car", "key": "a red car, 8k", "text": "a red car, 8k", "thumb": False}
    try:
        for against, expected in (("plain", len("a red car")), ("rewrite", len("a red car, 8k"))):
            cfg = load_config("tiny", overrides=["eval.images.steps=1", "eval.scorers=[textlen]",
                                                 f"eval.score_against={against}"])
            (result,) = decode_results(EvalWorker(cfg.to_dict()).process(encode_items([item])))
            assert decode_record(result["record"])["extra"]["textlen"] == [expected] * cfg.eval.images.per_prompt
    finally:
        SCORERS.pop("textlen")
        SCORE_KEYS.pop("textlen")


def test_missing_scorer_package_or_unknown_scorer_is_a_config_error(monkeypatch):
    import importlib.util

    from common.config import ConfigError
    from eval.cli import check_scorers

    with pytest.raises(ConfigError, match="unknown scorer 'pickscore'"):
        check_scorers(["pickscore"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("ImageReward", "hpsv2") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install image-reward"):
        check_scorers(["imagereward"])
    with pytest.raises(ConfigError, match=r"pip install hpsv2"):
        check_scorers(["hps"])


def test_conditioning_renders_like_the_text_it_encodes():
    """A Conditioning rewrite (IPGO's output) goes through the same noise and scorers: the prompt embeddings of
    a text render the same images as the text."""
    from common.config import load_config
    from eval.cache import decode_record
    from eval.methods import Conditioning, MethodOutput, Rewrite
    from eval.runner import work_items
    from eval.worker import EvalWorker, decode_results, encode_items

    cfg = load_config("tiny", overrides=["eval.images.steps=2"])
    worker = EvalWorker(cfg.to_dict())
    pipe = worker.renderer.pipe
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a red car, 8k", "cpu", 1, False)
    cond = Conditioning(embeds[0].numpy(), label="ipgo(a red car)")
    outputs = {"ipgo": {"s": [MethodOutput("a red car", [Rewrite("ipgo(a red car)", cond)])]},
               "rule": {"s": [MethodOutput("a red car", [Rewrite("a red car, 8k")])]}}
    items = work_items(cfg, {"s": ["a red car"]}, outputs)
    assert {it["key"] for it in items} == {"a red car", "a red car, 8k", f"embeds:{cond.digest()}"}
    results = {r["key"]: decode_record(r["record"]) for r in decode_results(worker.process(encode_items(items)))}
    by_text, by_embeds = results["a red car, 8k"], results[f"embeds:{cond.digest()}"]
    assert by_embeds["aes"] == pytest.approx(by_text["aes"], abs=1e-4)
    assert by_embeds["clip"] == pytest.approx(by_text["clip"], abs=1e-4)


def test_eval_renders_with_a_transfer_target(workdir, transfer_target):
    """`--target-model DIR`: the paper's zero-shot transfer -- the same methods, rendered by another pipeline
    class (a tiny SD3 here), named in results.json and report.md."""
    path, _ = workdir
    target = transfer_target("sd3")
    proc = pag(["--methods", "plain,rule", "--name", "sd3", "--target-model", str(target), "--limit", "1",
                "--rewrites", "2", "--decode", "sample", "--datasets", "lexica", "--no-progress"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = path / "runs" / "eval-sd3"
    results = json.loads((out / "results.json").read_text())
    assert results["target_model"] == str(target)
    assert math_finite(results["table"]["rule"]["lexica"]["reward"]["mean"])
    assert f"rendered by `{target}`" in (out / "report.md").read_text()
