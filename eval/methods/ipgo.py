"""`ipgo` in `pag eval`: IPGO's learned tokens, handed to the harness as conditioning (not text).

    --methods ipgo                      optimise every evaluated prompt now (prompt-wise, cfg.ipgo settings)
    --methods ipgo:runs/<ipgo run>      a `pag ipgo` run: its prompt-wise tokens (prompts it lacks are
                                        optimised into it), or, for a prompt-batch run, its one token set
    --methods ipgo-batch:runs/<run>     the same with another label (any label `ipgo-…` is this method)
    --methods ipgo-pag:runs/<PAG run>   pag+ipgo: the PAG policy's best rewrite (eval decoding, one rewrite),
                                        then IPGO on that rewrite ('+' is not allowed in a label)

Each prompt gets one rewrite: text = the prompt (IPGO does not change words), conditioning =
[prefix; H; suffix] and the empty prompt's states at the same length. The harness renders it from its own
seeds (eval.images.seed + i), which IPGO never trained on, and scores it with every configured scorer (the
reward-hacking check). Each output's `info` also carries IPGO's own reward on the noise it was optimised with
and on held-out seeds (same sampler and reward) and the cost per prompt, from the run's results.jsonl: the
report's IPGO section (eval/ipgo_report.py). With no path the run directory is runs/ipgo-eval__<config hash>,
so a second evaluation reuses the tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from eval.methods.base import Conditioning, Method, MethodOutput, Rewrite
from eval.spec import MethodSpec, MethodSpecError

log = logging.getLogger(__name__)


class IpgoMethod(Method):
    def __init__(self, label: str, cfg, run_dir: Path, device: str = "cpu", policy: Method | None = None) -> None:
        self.name, self.cfg, self.run_dir, self.device, self.policy = label, cfg, run_dir, device, policy
        self.batch_tokens = run_dir / "batch" / "tokens.safetensors"
        self._models = None

    def identity(self) -> dict:
        return {"name": self.name, "run": str(self.run_dir), "ipgo": self.cfg.ipgo.model_dump(mode="json"),
                "policy": self.policy.identity() if self.policy is not None else None}

    def models(self):
        from ipgo.jobs import models_for

        if self._models is None:
            self._models = models_for(self.cfg)
        return self._models

    def _tokens(self, prompts: Sequence[str]) -> dict[str, tuple[dict, dict]]:
        """prompt → (tokens, cost): the batch set for every prompt, or each prompt's own (optimised now if missing)."""
        from eval.ipgo_report import cost_of
        from ipgo.jobs import append_result, load_tokens, prompt_job, slug

        if self.batch_tokens.is_file():
            tokens = load_tokens(self.batch_tokens)
            summary = json.loads((self.batch_tokens.parent / "result.json").read_text())
            cost = cost_of(summary, max(1, int(summary.get("train_prompts", 1))))
            return {p: (tokens, cost) for p in prompts}
        lines = {line["prompt"]: line for line in _read_lines(self.run_dir / "results.jsonl") if not line.get("heldout")}
        todo = [p for p in dict.fromkeys(prompts) if p not in lines]
        first = 1 + max((line["index"] for line in lines.values()), default=-1)
        for index, prompt in enumerate(todo, start=first):  # optimised now, in this process, into the run
            line = prompt_job(self.cfg.to_dict(), index, prompt, str(self.run_dir / "prompts" / slug(index, prompt)))
            append_result(self.run_dir, line)
            lines[prompt] = line
        out = {}
        for prompt in prompts:
            line = lines[prompt]
            out[prompt] = (load_tokens(self.run_dir / "prompts" / line["dir"] / "tokens.safetensors"), cost_of(line))
            log.info("%s: %r reward on its optimised noise %.4f (plain %.4f), %.1f s, peak %s bytes", self.name,
                     prompt, line["best_reward"], line["initial_reward"], line.get("seconds", 0.0),
                     line.get("peak_memory_bytes"))
        return out

    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        import torch

        from eval.ipgo_report import heldout_seeds, measure
        from ipgo.conditioning import inject

        models = self.models()
        texts = list(prompts)
        if self.policy is not None:  # pag+ipgo: refine the policy's best rewrite of each prompt
            texts = [(o.rewrites[0].text if o.rewrites else o.prompt) for o in self.policy.rewrite(prompts, 1)]
        tokens = self._tokens(texts)
        ev = self.cfg.eval
        seeds = heldout_seeds(ev.images.seed, ev.images.per_prompt, self.cfg.ipgo.seed)
        outputs = []
        for prompt, text in zip(prompts, texts):
            enc = models.encoder.encode(text)
            t, cost = tokens[text]
            with torch.no_grad():
                cond = inject(enc.states, t["prefix"].to(enc.states.device), t["suffix"].to(enc.states.device))
            conditioning = Conditioning(prompt_embeds=cond[0].float().cpu().numpy().astype(np.float32),
                                        negative_prompt_embeds=enc.uncond[0].float().cpu().numpy().astype(np.float32),
                                        label=f"{text} [{self.name}]")
            outputs.append(MethodOutput(prompt, [Rewrite(text, conditioning)], info=measure(models, text, t, seeds, {
                **cost, "reward": "+".join(self.cfg.ipgo.reward), "train_seed": self.cfg.ipgo.seed})))
        return outputs

    def close(self) -> None:
        self._models = None
        if self.policy is not None:
            self.policy.close()


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pag_policy(spec: MethodSpec, cfg, device: str) -> Method:
    from eval.methods import run_model_config, run_format
    from eval.methods.policy import PolicyMethod
    from eval.spec import resolve_policy_dir

    weights, run_dir = resolve_policy_dir(spec.path, spec.raw)
    return PolicyMethod(f"{spec.label}-policy", weights, run_model_config(run_dir, cfg.model), cfg.eval,
                        fmt=run_format(run_dir, cfg), device=device, source=spec.raw)


def _private_run(cfg, extra: str = "") -> Path:
    """runs/ipgo-eval__<hash of model, ipgo and `extra`>: where prompts optimised at eval time go."""
    digest = hashlib.sha256(json.dumps({"model": cfg.model.model_dump(mode="json"), "extra": extra,
                                        "ipgo": cfg.ipgo.model_dump(mode="json")}, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = Path(cfg.run.runs_dir) / f"ipgo-eval__{digest}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    return run_dir


def build(spec: MethodSpec, cfg, device: str = "cpu") -> IpgoMethod:
    if spec.path and (Path(spec.path) / "checkpoints").is_dir():  # a PAG training run: pag+ipgo
        policy = _pag_policy(spec, cfg, device)
        return IpgoMethod(spec.label, cfg, _private_run(cfg, json.dumps(policy.identity(), sort_keys=True)), device, policy)
    if spec.path:
        run_dir = Path(spec.path)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise MethodSpecError(f"--methods entry {spec.raw!r}: {run_dir} is not a `pag ipgo` run directory "
                                  "(no config.yaml); give one, or plain `ipgo` to optimise the prompts now")
        from common.config import Config

        run_cfg = Config.model_validate(yaml.safe_load(saved.read_text()))
        if run_cfg.model != cfg.model:
            raise MethodSpecError(f"--methods entry {spec.raw!r}: {run_dir} was trained with another model config "
                                  "than this evaluation's (its tokens live in that text encoder's space); evaluate "
                                  "with the same --preset / model settings")
        cfg = cfg.model_copy(update={"ipgo": run_cfg.ipgo})
    else:
        run_dir = _private_run(cfg)
    return IpgoMethod(spec.label, cfg, run_dir, device)
