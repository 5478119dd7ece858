"""
alternate.py: hierarchical in-context RL (DESIGN.md §6), the five experiments and every ablation: `python alternate.py
[--exp N] [--resume DIR]`. Each round: LL steps with the HL's contexts, HL steps against the fixed LL, an evaluation."""

import os, time
from dataclasses import asdict, dataclass, replace

import torch

import context_grpo
import grpo
import hl_generator
from eval_math500 import evaluate, print_summary
from grpo import arg

EXPERIMENTS = {  # what --exp sets; each overridable. retrieved / random (--hl): contexts without an HL to train
    1: dict(hl="none", context_at="none", ll_steps=4, hl_steps=0),  # GRPO, no context
    2: dict(hl="pretrained", context_at="test", ll_steps=0, hl_steps=0),  # pretrained HL, frozen LL
    3: dict(
        hl="pretrained", context_at="train+test", ll_steps=4, hl_steps=1
    ),  # pretrained HL, both trained
    4: dict(hl="sft", context_at="test", ll_steps=0, hl_steps=0),  # SFT HL, frozen LL
    5: dict(hl="sft", context_at="train+test", ll_steps=4, hl_steps=1),
}  # SFT HL, both trained: HICRL


@dataclass
class Config(grpo.Config):
    HIDDEN = ("steps", "save_every", "bonus_steps")
    out: str = arg(
        "runs/alternate", "run folder: config.json, metrics.jsonl, eval*.json*, hl_sft/, ckpt/"
    )
    lam: float = arg(
        0.1, "lambda: weight of the utilisation reward (0 = the plain GRPO reward)", ge=0
    )
    tau: float = arg(1.0, "tau': symmetric clip of the utilisation log-ratio", gt=0)
    util_reduce: str = arg(
        "mean", "utilisation over the tokens: mean (a KL rate) or sum", choices=["mean", "sum"]
    )
    prior: str = arg(
        "init",
        "q: init (frozen phi_0), base (--base-model), self (the LL)",
        choices=["init", "base", "self"],
    )
    base_model: str = arg(
        "", "--prior base: the pretrained model phi_0 came from (default: --model)"
    )
    icpo: bool = arg(
        False,
        "train the LL by ICPO (§7): the contexts, else random training pairs, as demonstrations",
    )
    n_off: int = arg(1, "ICPO: IEF rollouts per problem (<= G - 1)", ge=0)
    icpo_bonus: float = arg(0.5, "ICPO: expert bonus beta_E, annealed as beta_E * (1 - t/T)", ge=0)
    gamma: float = arg(0.1, "ICPO: shaping f(p) = p / (p + gamma) on IEF tokens", gt=0)
    delta: float = arg(1.0, "ICPO: ERRS acceptance threshold on R_task", ge=0, le=1)
    bonus_steps: int = arg(0, "ICPO: T, the run's LL steps at its start", ge=0)
    max_context_tokens: int = arg(64, "HL context budget (and D_SFT's target budget)", ge=1)
    sft_steps: int = arg(20, "SFT steps for theta_0", ge=1)
    sft_batch: int = arg(4, "SFT pairs per step", ge=1)
    sft_lr: float = arg(5e-5, "SFT learning rate", gt=0)
    sft_heldout: int = arg(32, "D_SFT pairs held out for the printed SFT loss", ge=0)
    hl_group: int = arg(4, "G_HL: contexts per problem in the HL update", ge=2)
    ll_answers: int = arg(1, "M: LL answers per context in the HL update", ge=1)
    alpha: float = arg(
        0.1, "alpha: weight of the LL's mean token log-prob in R_HL (0 = task only)", ge=0
    )
    beta_hl: float = arg(0.04, "beta_HL: k3 KL to the frozen pi_SFT (0 = none)", ge=0)
    hl_temperature: float = arg(
        0.7, "HL sampling temperature in training (0 = 1; evaluation is greedy)", ge=0
    )
    self_threshold: float = arg(
        0.9, "leakage guard: an example restating x (cosine >= this) is none", gt=0, le=1
    )
    exp: int = arg(
        5, "experiment 1-5, the defaults of EXPERIMENTS in alternate.py", choices=[1, 2, 3, 4, 5]
    )
    hl: str = arg(
        "",
        "contexts: from an HL, none, or retrieved / random ('' = --exp's)",
        choices=["", "none", "pretrained", "sft", "retrieved", "random"],
    )
    context_at: str = arg(
        "",
        "where the LL sees contexts ('' = from --exp)",
        choices=["", "none", "test", "train+test"],
    )
    rounds: int = arg(2, "T: rounds of (LL phase, HL phase)", ge=1)
    ll_steps: int = arg(-1, "LL steps per round (-1 = from --exp)", ge=-1)
    hl_steps: int = arg(-1, "HL steps per round (-1 = from --exp)", ge=-1)
    frozen_ll: bool = arg(False, "ablation: the LL never updates (the HL still learns against it)")
    joint: bool = arg(
        False, "ablation: one combined LL+HL step per round instead of alternating phases"
    )
    hl_model: str = arg("", "HL base model, same tokenizer (default: --model)")
    hl_init: str = arg("", "an SFT'd HL folder: theta_0 without running SFT")
    ll_init: str = arg(
        "",
        "phi_0, a trained LL: OUT/ckpt/ll of alternate.py, OUT/ckpt/policy of grpo.py (default: --model)",
    )
    hl_lr: float = arg(1e-5, "HL learning rate", gt=0)
    eval_data: str = arg(
        "", "held-out problems (default: --data's test split, else math500); removed from training"
    )
    eval_limit: int = arg(64, "evaluate on the first N held-out problems (0 = all)", ge=0)
    eval_every: int = arg(2, "evaluate every N rounds (and after the last)", ge=1)
    eval_max_new_tokens: int = arg(0, "LL budget at evaluation (0 = --max-new-tokens)", ge=0)
    group_size: int = arg(4, "G: LL rollouts per problem, each with its own context", ge=2)
    max_new_tokens: int = arg(48, "LL completion budget", ge=1)
    temperature: float = arg(
        0.7, "LL sampling temperature (0 = greedy); log-probs use the same T", ge=0
    )
    lr: float = arg(3e-5, "LL learning rate (AdamW); the MATH commands use 1e-5", gt=0)

    def check(self):
        """Contradictory flags, once --exp has filled in its defaults: one message before anything loads."""
        d = experiment_defaults(self)
        self.bonus_steps = self.bonus_steps or self.rounds * max(
            d["ll_steps"], 1
        )  # ICPO's T, fixed at the start
        self.eval_data = self.eval_data or grpo.HELDOUT.get(self.data, "math500")
        for bad, why in (
            (
                d["hl"] == "none"
                and (d["hl_steps"] > 0 or self.joint or d["context_at"] != "none"),
                "--hl none: no contexts and no HL to train (--hl-steps 0, --context-at none, no --joint)",
            ),
            (
                d["hl"] != "none" and d["context_at"] == "none",
                f"--hl {d['hl']} with --context-at none: its contexts would be used nowhere (pass --hl none, "
                "or --context-at test or train+test)",
            ),
            (self.exp in (2, 4) and d["ll_steps"] > 0, f"--exp {self.exp} keeps the LL frozen"),
            (
                self.joint
                and (self.icpo or not d["ll_steps"] or d["hl"] not in ("pretrained", "sft")),
                "--joint needs an HL, LL steps, and no --icpo",
            ),
        ):
            if bad:
                raise SystemExit(why)
        context_grpo.check_flags(self)


def experiment_defaults(cfg):
    """The fields --exp sets, where left at '' / -1; --frozen-ll means 0 LL steps, --joint or no HL 0 HL steps."""
    d = {
        k: v if getattr(cfg, k) in ("", -1) else getattr(cfg, k)
        for k, v in EXPERIMENTS[cfg.exp].items()
    }
    return {
        **d,
        "ll_steps": 0 if cfg.frozen_ll else d["ll_steps"],
        "hl_steps": 0 if d["hl"] in ("retrieved", "random") or cfg.joint else d["hl_steps"],
    }


def changed_flags(cfg):
    """The flags that differ from the defaults of cfg's experiment, "name=value, ..." (the report's flags column)."""
    base = {
        **asdict(Config()),
        **experiment_defaults(Config(exp=cfg.exp)),
        "eval_data": grpo.HELDOUT.get(cfg.data, "math500"),
    }
    skip = {"out", "resume", "overwrite", "device", "exp", *Config.HIDDEN}
    return ", ".join(
        f"{k}={v}" for k, v in asdict(cfg).items() if k not in skip and base.get(k) != v
    )


def joint_step(ll, ref, prior, hl, sft_model, opts, tok, batch, cfg, idx, eos):
    """--joint: contexts sampled once; the LL updated on its rollouts with them, the HL on R_HL of the same rollouts."""
    ctx, hl_prompts, hl_comps, ctx_stats = hl_generator.hl_contexts(
        hl, tok, batch, cfg.group_size, cfg, eos, "ctx", idx
    )
    record, roll = context_grpo.ll_step(ll, ref, prior, opts["ll"], tok, batch, ctx, cfg, idx, eos)
    r_hl = hl_generator.hl_reward(
        roll["acc"] + cfg.format_bonus * roll["wrote_box"],
        *grpo.pad_completions(roll["sampler_logp"], value=0.0),
        cfg.alpha,
    )
    hl_stats = hl_generator.hl_update(
        hl, sft_model, opts["hl"], hl_prompts, hl_comps, r_hl, cfg, cfg.group_size
    )
    return {
        **record,
        **{f"hl_{k}": v for k, v in hl_stats.items()},
        "hl_reward": r_hl.mean().item(),
        **ctx_stats,
    }


def load_hl(cfg, tok, problems, held, out, device):
    """theta_0: the pretrained HL, --hl-init, or SFT on D_SFT, saved whole to OUT/hl_sft and reused on resume.
    Returns (the HL, the share of D_SFT that SFT dropped, None without SFT)."""
    sft_dir, sft = os.path.join(out, "hl_sft"), cfg.hl == "sft" and not cfg.hl_init
    done = sft and os.path.exists(os.path.join(sft_dir, "config.json"))
    print(
        f"theta_0: the SFT'd HL already in {sft_dir}"
        if done
        else f"theta_0: {'SFT on D_SFT' if sft else 'as loaded'}"
    )
    hl, _ = grpo.load_model(
        sft_dir if done else cfg.hl_init or cfg.hl_model or cfg.model,
        device,
        trainable=True,
        precision=cfg.precision,
        grad_ckpt=cfg.grad_ckpt,
        flag="--hl-init or --hl-model",
    )
    dropped = None
    if sft and not done:
        pairs = hl_generator.build_sft_pairs(problems, held, cfg.self_threshold)
        dropped = hl_generator.sft(hl, tok, pairs, cfg, tok.eos_token_id)
        if grpo.rank() == 0:  # whole or not at all
            hl.save_pretrained(sft_dir + ".tmp")
            tok.save_pretrained(sft_dir + ".tmp")
            os.replace(sft_dir + ".tmp", sft_dir)
        grpo.barrier()
    return hl.eval(), dropped


def budget_warning(record, flag, budget):
    """One line when most answers hit their token budget before an EOS (R_task is then ~0 and nothing is learnt)."""
    if record.get("finished", 1.0) >= 0.5:
        return None
    return (
        f"WARNING: {1 - record['finished']:.0%} of the answers hit {flag} {budget} before their end: R_task is ~0 "
        f"and nothing is learnt; pass a larger {flag} (MATH: 1024)"
    )


def main(cfg):
    cfg = replace(cfg, **experiment_defaults(cfg))
    eval_all = grpo.load_problems(
        cfg.eval_data
    )  # one evaluation set whatever the seed: eval_math500.py --limit's
    eval_problems = eval_all[: cfg.eval_limit or None]
    problems = hl_generator.drop_overlap(
        grpo.load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True), eval_all
    )
    device = grpo.init_distributed(
        cfg.device,
        {
            "--batch-problems": cfg.batch_problems,
            "--sft-batch": cfg.sft_batch if cfg.hl == "sft" and not cfg.hl_init else 0,
        },
    )
    out, t_start, hl_free = grpo.start_run(cfg), time.time(), cfg.hl in ("retrieved", "random")
    test_ctx, train_ctx = (
        cfg.hl != "none" and cfg.context_at != "none",
        cfg.hl != "none" and cfg.context_at == "train+test",
    )
    print(
        f"HICRL experiment {cfg.exp} on {device}: {changed_flags(cfg) or 'the default, ~7 min on 2 CPU cores'}"
    )
    ll, tok = grpo.load_model(
        cfg.ll_init or cfg.model,
        device,
        trainable=True,
        precision=cfg.precision,
        grad_ckpt=cfg.grad_ckpt,
        flag="--ll-init" if cfg.ll_init else "--model",
    )
    ref, prior = context_grpo.make_prior(
        ll, cfg
    )  # p_ref = q = frozen phi_0, copied before a resume loads phi_t
    models, opts = (
        {"ll": ll},
        {"ll": torch.optim.AdamW(ll.parameters(), lr=cfg.lr, weight_decay=0.0)},
    )
    problems, eos, hl = (
        grpo.fit_prompts(tok, problems, cfg.max_prompt_tokens),
        grpo.eos_token_ids(ll, tok),
        None,
    )
    warnings = []  # what makes this run learn nothing, said when found and again at the end

    def warn(line):
        if line and line not in warnings:
            warnings.append(line)
            print(line)

    if cfg.hl in (
        "pretrained",
        "sft",
    ):  # pi_SFT: theta_0 frozen (the pretrained HL itself in experiments 2 and 3)
        hl, sft_dropped = load_hl(cfg, tok, problems, eval_all, out, device)
        models["hl"] = hl
        sft_model, opts["hl"] = (
            grpo.frozen_copy(hl),
            torch.optim.AdamW(hl.parameters(), lr=cfg.hl_lr, weight_decay=0.0),
        )
        if sft_dropped is not None and sft_dropped > 0.5:
            warn(
                f"WARNING: {sft_dropped:.0%} of D_SFT's examples are longer than --max-context-tokens "
                f"{cfg.max_context_tokens}: the HL learns from few; pass a larger --max-context-tokens (MATH: 384)"
            )
    # where training contexts come from without an HL: retrieved / random, or ICPO's random demonstrations
    if hl_free and train_ctx:
        kind = cfg.hl
    elif cfg.icpo:
        kind = "random"
    else:
        kind = "none"
    pool = problems
    if hl_free or kind == "random":  # held to the HL's budget, as D_SFT's targets are
        pool = hl_generator.within_budget(tok, problems, cfg.max_context_tokens)
    source = hl_generator.context_source(kind, pool, problems, cfg.seed, cfg.self_threshold)
    test_ctxs = None  # retrieved / random contexts at test time: the same every round
    if hl_free and test_ctx:
        test_src = hl_generator.context_source(
            cfg.hl, pool, eval_problems, cfg.seed, cfg.self_threshold
        )
        test_ctxs = [c[0] for c in test_src(eval_problems, 1, 0, "test")]
    start = grpo.load_checkpoint(out, models, opts) if cfg.resume else 0

    def run_eval(
        t,
    ):  # accuracy on the held-out problems, with the contexts at test time: eval.json, metrics.jsonl
        budget = cfg.eval_max_new_tokens or cfg.max_new_tokens
        s = evaluate(
            ll,
            tok,
            eval_problems,
            eos,
            hl if test_ctx and not hl_free else None,
            contexts=test_ctxs,
            max_new_tokens=budget,
            max_context_tokens=cfg.max_context_tokens,
            self_threshold=cfg.self_threshold,
            seed=cfg.seed,
            out_file=f"{out}/eval_round{t + 1}.jsonl",
        )
        print_summary(s)
        warn(
            budget_warning(
                s,
                "--eval-max-new-tokens" if cfg.eval_max_new_tokens else "--max-new-tokens",
                budget,
            )
        )
        s.update(
            rounds=t + 1, wall_clock=time.time() - t_start, exp=cfg.exp, flags=changed_flags(cfg)
        )
        log("eval", t, {k: v for k, v in s.items() if not isinstance(v, (dict, str))})
        grpo.write_json(os.path.join(out, "eval.json"), s)

    def log(
        phase, t, record, k=None, steps=None
    ):  # a step's record over ranks (an evaluation is gathered), metrics.jsonl
        record = grpo.reduce_record(record) if k is not None else record
        grpo.log_jsonl(
            out,
            "metrics.jsonl",
            {
                "step": t + 1,
                "phase": phase,
                **{f"{phase}/{n}": v for n, v in record.items() if n != "step"},
            },
        )
        if k is not None:
            context_grpo.print_record(
                f"round {t + 1}/{cfg.rounds} {phase} step", {**record, "step": k + 1}, steps
            )
            warn(budget_warning(record, "--max-new-tokens", cfg.max_new_tokens))

    def draw(
        idx, purpose
    ):  # this rank's share of step idx's problems, from the LL's ("data") or the HL's stream
        indices = grpo.batch_indices(len(problems), cfg.batch_problems, idx, cfg.seed, purpose)
        return grpo.my_share([problems[i] for i in indices])

    def evaluations():  # the logged evaluations, round 0 first
        path = os.path.join(out, "metrics.jsonl")
        return (
            [r for r in grpo.read_jsonl(path) if r["phase"] == "eval"]
            if os.path.exists(path)
            else []
        )

    if start == 0 and not any(r["step"] == 0 for r in evaluations()):
        run_eval(
            -1
        )  # round 0, also on a resume killed before it: every later number has its baseline beside it
    if not (cfg.ll_steps or cfg.hl_steps):
        print(f"nothing to train in experiment {cfg.exp}: the evaluation above is the result")
        print("".join(w + "\n" for w in warnings), end="")
        return grpo.save_checkpoint(out, 0, models, opts, tok)
    for t in range(start, cfg.rounds):
        for k in range(cfg.ll_steps):  # 1. the LL phase, the HL fixed
            idx, batch = t * cfg.ll_steps + k, draw(t * cfg.ll_steps + k, "data")
            n, purpose = (cfg.n_off, "demo") if cfg.icpo else (cfg.group_size, "ctx")
            if train_ctx and hl is not None and not cfg.joint:  # sampled from the HL
                ctx, _, _, stats = hl_generator.hl_contexts(
                    hl, tok, batch, n, cfg, eos, purpose, idx
                )
            else:  # without an HL: retrieved, random or none
                ctx, stats = source(batch, n, idx, purpose), {}
            record = (
                joint_step(ll, ref, prior, hl, sft_model, opts, tok, batch, cfg, idx, eos)
                if cfg.joint
                else context_grpo.ll_round_step(
                    ll, ref, prior, opts["ll"], tok, batch, ctx, cfg, idx, eos
                )[0]
            )
            log("ll", t, {**record, **stats}, k, cfg.ll_steps)
        for idx in range(t * cfg.hl_steps, (t + 1) * cfg.hl_steps):  # 2. the HL phase, the LL fixed
            log(
                "hl",
                t,
                hl_generator.hl_step(
                    hl, sft_model, ll, opts["hl"], tok, draw(idx, "hl"), cfg, idx, eos
                ),
                idx - t * cfg.hl_steps,
                cfg.hl_steps,
            )
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:  # 3. evaluate, 4. checkpoint
            run_eval(t)
        grpo.save_checkpoint(out, t + 1, models, opts, tok)
    minutes = (time.time() - t_start) / 60
    print(
        before_after(evaluations(), test_ctx)
        + f"; {minutes:.1f} min, logs in {out}"
        + "".join("; " + w for w in warnings)
    )


def before_after(evals, test_ctx):
    """The closing verdict: round 0 against the last evaluation, both made on the same problems with the same budget."""
    first, last = evals[0], evals[-1]
    if first["step"] != 0:
        return f"before/after: no round-0 evaluation in metrics.jsonl, so no baseline to compare round {last['step']} with"
    settings = lambda r: (r["eval/n"], r.get("eval/max_new_tokens"))
    if settings(first) != settings(last):
        return (
            f"before/after: round 0 was evaluated on {first['eval/n']} problems at {first.get('eval/max_new_tokens')}"
            f" tokens, round {last['step']} on {last['eval/n']} at {last.get('eval/max_new_tokens')}: not compared"
        )
    acc = lambda r: (
        f"{r['eval/acc']:.3f} [{r['eval/ci_low']:.3f}, {r['eval/ci_high']:.3f}]"
    )  # with its 95% interval
    verdict = (
        "a gain: intervals apart"
        if last["eval/ci_low"] > first["eval/ci_high"]
        else "intervals overlap"
    )
    line = (
        f"before/after: accuracy {acc(first)} at round 0 -> {acc(last)} after round {last['step']} on "
        f"{last['eval/n']} problems at {last['eval/max_new_tokens']} tokens: {verdict}"
    )
    if test_ctx:
        line += f"; contexts that carried the answer: {last['eval/ctx_has_answer']:.2f}"
    return line


if __name__ == "__main__":
    main(grpo.parse_config(Config))
