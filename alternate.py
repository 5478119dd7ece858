"""alternate.py: hierarchical in-context RL (README "The method", 5), the five experiments and every
ablation: `python alternate.py [--exp N]`. Each round: LL steps with the HL's contexts, HL steps
against the fixed LL, a checkpoint; every --eval-every rounds an evaluation."""

import os
import time
from dataclasses import asdict, dataclass, replace

import torch

import context_grpo
import grpo
import hl_generator
from eval_math500 import before_after, evaluate, print_summary
from grpo import arg

# what --exp sets; each overridable. --hl retrieved / random: contexts without an HL
EXPERIMENTS = {
    1: dict(hl="none", context_at="none", ll_steps=4, hl_steps=0),  # GRPO, no context
    2: dict(hl="pretrained", context_at="test", ll_steps=0, hl_steps=0),  # pretrained HL, frozen LL
    3: dict(hl="pretrained", context_at="train+test", ll_steps=4, hl_steps=1),  # both trained
    4: dict(hl="sft", context_at="test", ll_steps=0, hl_steps=0),  # SFT HL, frozen LL
    5: dict(hl="sft", context_at="train+test", ll_steps=4, hl_steps=1),  # both trained: HICRL
}
CONTEXT_AT = ["", "none", "test", "train+test"]
HLS = ["", "none", "pretrained", "sft", "retrieved", "random"]
PRIORS = ["init", "base", "self"]


@dataclass
class Config(grpo.Config):
    HIDDEN = ("steps", "save_every", "bonus_steps")
    out: str = arg("runs/alternate", "run folder: config.json, metrics.jsonl, eval*, ckpt/")
    lam: float = arg(0.1, "lambda: weight of U~ in the LL's reward (0 = plain GRPO)", ge=0)
    tau: float = arg(1.0, "tau': symmetric clip of the utilisation log-ratio", gt=0)
    util_reduce: str = arg("mean", "U~ over the tokens: mean or sum", choices=["mean", "sum"])
    prior: str = arg("init", "q: init (phi_0), base (--base-model), self", choices=PRIORS)
    base_model: str = arg("", "--prior base: the model phi_0 came from (default: --model)")
    icpo: bool = arg(False, "train the LL by ICPO, contexts (or random pairs) as demos")
    n_off: int = arg(1, "ICPO: IEF rollouts per problem (<= G - 1)", ge=0)
    icpo_bonus: float = arg(0.5, "ICPO: expert bonus beta_E, annealed as beta_E (1 - t/T)", ge=0)
    gamma: float = arg(0.1, "ICPO: shaping f(p) = p / (p + gamma) on IEF tokens", gt=0)
    delta: float = arg(1.0, "ICPO: ERRS acceptance threshold on R_task", ge=0, le=1)
    bonus_steps: int = arg(0, "ICPO: T, the run's LL steps at its start", ge=0)
    max_context_tokens: int = arg(64, "budget of every context and of D_SFT's targets", ge=1)
    sft_steps: int = arg(20, "SFT steps for theta_0", ge=1)
    sft_batch: int = arg(4, "SFT pairs per step", ge=1)
    sft_lr: float = arg(5e-5, "SFT learning rate", gt=0)
    sft_heldout: int = arg(32, "D_SFT pairs held out for the printed SFT loss", ge=0)
    hl_group: int = arg(4, "G_HL: contexts per problem in the HL update", ge=2)
    ll_answers: int = arg(1, "M: LL answers per context in the HL update", ge=1)
    alpha: float = arg(0.1, "alpha: weight of the LL's mean log-prob in R_HL (0 = task only)", ge=0)
    beta_hl: float = arg(0.04, "beta_HL: k3 KL to the frozen pi_SFT (0 = none)", ge=0)
    hl_temperature: float = arg(0.7, "HL sampling temperature in training (0 = 1)", ge=0)
    hl_ll_temperature: float = arg(-1, "LL temperature in the HL step (-1 = --temperature)", ge=-1)
    self_threshold: float = arg(0.9, "leakage guard: cosine that makes an example x", gt=0, le=1)
    exp: int = arg(5, "experiment 1-5 (EXPERIMENTS in alternate.py)", choices=[1, 2, 3, 4, 5])
    hl: str = arg("", "contexts from an HL, none, retrieved, random ('' = --exp's)", choices=HLS)
    context_at: str = arg("", "where the LL sees contexts ('' = --exp's)", choices=CONTEXT_AT)
    rounds: int = arg(2, "T: rounds of (LL phase, HL phase)", ge=1)
    hl_first: int = arg(0, "the first N rounds: the HL phase alone (a longer HL phase first)", ge=0)
    ll_steps: int = arg(-1, "LL steps per round (-1 = --exp's)", ge=-1)
    hl_steps: int = arg(-1, "HL steps per round (-1 = --exp's)", ge=-1)
    frozen_ll: bool = arg(False, "ablation: the LL never updates (the HL still learns)")
    joint: bool = arg(False, "ablation: one combined LL+HL step instead of alternating phases")
    hl_model: str = arg("", "HL base model, same tokenizer (default: --model)")
    hl_init: str = arg("", "an SFT'd HL folder: theta_0 without running SFT")
    ll_init: str = arg("", "phi_0: OUT/ckpt/ll of alternate.py, OUT/ckpt/policy of grpo.py")
    hl_lr: float = arg(1e-5, "HL learning rate", gt=0)
    eval_data: str = arg("", "held-out problems (default: --data's test split, else math500)")
    eval_limit: int = arg(64, "evaluate on the first N held-out problems (0 = all)", ge=0)
    eval_every: int = arg(2, "evaluate every N rounds (and after the last)", ge=1)
    eval_max_new_tokens: int = arg(0, "LL budget at evaluation (0 = --max-new-tokens)", ge=0)
    group_size: int = arg(4, "G: LL rollouts per problem, each with its own context", ge=2)
    max_new_tokens: int = arg(48, "LL completion budget", ge=1)
    temperature: float = arg(0.7, "LL sampling temperature (0 = greedy)", ge=0)
    lr: float = arg(3e-5, "LL learning rate (AdamW); the MATH commands use 1e-5", gt=0)

    def check(self):
        """Contradictory flags, once --exp set its defaults: one message before anything loads."""
        d = experiment_defaults(self)
        ll_rounds = max(self.rounds - self.hl_first, 0)  # the rounds with LL steps
        self.bonus_steps = self.bonus_steps or ll_rounds * max(d["ll_steps"], 1)  # ICPO's T
        self.eval_data = self.eval_data or grpo.HELDOUT.get(self.data, "math500")
        if d["hl"] == "none" and (d["hl_steps"] > 0 or self.joint or d["context_at"] != "none"):
            raise SystemExit("--hl none: no contexts and no HL to train (--hl-steps 0, no --joint)")
        if d["hl"] != "none" and d["context_at"] == "none":
            raise SystemExit(f"--hl {d['hl']} with --context-at none: its contexts go nowhere")
        if self.exp in (2, 4) and d["ll_steps"] > 0:
            raise SystemExit(f"--exp {self.exp} keeps the LL frozen")
        if self.joint and (self.icpo or not d["ll_steps"] or d["hl"] not in ("pretrained", "sft")):
            raise SystemExit("--joint needs an HL, LL steps, and no --icpo")
        context_grpo.check_flags(self)


def experiment_defaults(cfg):
    """--exp's fields where left at '' / -1 (--frozen-ll: no LL step; --joint, no HL: no HL step)"""
    d = {}
    for k, v in EXPERIMENTS[cfg.exp].items():
        d[k] = v if getattr(cfg, k) in ("", -1) else getattr(cfg, k)
    if cfg.frozen_ll:
        d["ll_steps"] = 0
    if d["hl"] in ("retrieved", "random") or cfg.joint:
        d["hl_steps"] = 0
    return d


def changed_flags(cfg):
    """The flags that differ from the defaults of cfg's experiment: "name=value, ..."."""
    base = {**asdict(Config()), **experiment_defaults(Config(exp=cfg.exp))}
    base["eval_data"] = grpo.HELDOUT.get(cfg.data, "math500")
    skip = {"out", "resume", "overwrite", "device", "exp", *Config.HIDDEN}
    changed = [f"{k}={v}" for k, v in asdict(cfg).items() if k not in skip and base.get(k) != v]
    return ", ".join(changed)


def load_hl(cfg, tok, problems, held, out, device):
    """theta_0: the pretrained HL, --hl-init, or SFT on D_SFT (saved whole to OUT/hl_sft, reused on
    resume). Returns (the HL, a warning when SFT dropped most of D_SFT, or None)."""
    sft_dir = os.path.join(out, "hl_sft")
    sft = cfg.hl == "sft" and not cfg.hl_init
    done = sft and os.path.exists(os.path.join(sft_dir, "config.json"))
    path = sft_dir if done else cfg.hl_init or cfg.hl_model or cfg.model
    print(f"theta_0: {path}" + (", then SFT on D_SFT" if sft and not done else ""))
    setting = dict(precision=cfg.precision, grad_ckpt=cfg.grad_ckpt, flag="--hl-init or --hl-model")
    hl, _ = grpo.load_model(path, device, trainable=True, **setting)
    warning = None
    if sft and not done:
        pairs = hl_generator.build_sft_pairs(problems, held, cfg.self_threshold)
        dropped = hl_generator.sft(hl, tok, pairs, cfg, tok.eos_token_id)
        if dropped > 0.5:
            warning = (
                f"WARNING: {dropped:.0%} of D_SFT's examples are over --max-context-tokens "
                f"{cfg.max_context_tokens}: the HL learns from few; pass a larger one (MATH: 384)"
            )
            print(warning)
        if grpo.rank() == 0:  # whole or not at all
            hl.save_pretrained(sft_dir + ".tmp")
            tok.save_pretrained(sft_dir + ".tmp")
            os.replace(sft_dir + ".tmp", sft_dir)
        grpo.barrier()
    return hl.eval(), warning


def joint_step(ll, ref, prior, hl, sft_model, opts, tok, batch, cfg, idx, eos):
    """--joint: contexts sampled once; the LL updated on its rollouts with them, the HL on R_HL of
    the same rollouts."""
    G = cfg.group_size
    ctx, hl_prompts, hl_comps, stats = hl_generator.hl_contexts(
        hl, tok, batch, G, cfg, eos, "ctx", idx
    )
    record, roll = context_grpo.ll_step(ll, ref, prior, opts["ll"], tok, batch, ctx, cfg, idx, eos)
    ll_logp, mask = grpo.pad_completions(roll.sampler_logp, value=0.0)
    r_hl = hl_generator.hl_reward(roll.r_task, ll_logp, mask, cfg.alpha)
    hl_stats = hl_generator.hl_update(hl, sft_model, opts["hl"], hl_prompts, hl_comps, r_hl, cfg, G)
    hl_record = {f"hl_{k}": v for k, v in hl_stats.items()}
    return {**record, **hl_record, "hl_reward": r_hl.mean().item(), **stats}


def contexts_without_hl(cfg, tok, problems, eval_problems):
    """Where the LL's training contexts come from (hl, retrieved, random: also ICPO's demonstrations
    without an HL, none), the source of those without an HL, and the test contexts without one."""
    kind = "random" if cfg.icpo else "none"
    if cfg.hl != "none" and cfg.context_at == "train+test":
        kind = "hl" if cfg.hl in ("pretrained", "sft") else cfg.hl
    hl_free = cfg.hl in ("retrieved", "random")
    pool = problems
    if hl_free or kind == "random":  # held to the HL's budget
        pool = hl_generator.within_budget(tok, problems, cfg.max_context_tokens)
    source = hl_generator.context_source(kind, pool, problems, cfg.seed, cfg.self_threshold)
    test_ctxs = None
    if hl_free and cfg.context_at != "none":  # drawn once, the same every round
        test = hl_generator.context_source(
            cfg.hl, pool, eval_problems, cfg.seed, cfg.self_threshold
        )
        test_ctxs = [c[0] for c in test(eval_problems, 1, 0, "test")]
    return kind, source, test_ctxs


def main(cfg):
    cfg = replace(cfg, **experiment_defaults(cfg))
    # --- data: the held-out problems (whatever the seed, as eval_math500.py's), never trained on
    eval_all = grpo.load_problems(cfg.eval_data)
    eval_problems = eval_all[: cfg.eval_limit or None]
    train = grpo.load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True)
    problems = hl_generator.drop_overlap(train, eval_all)
    sft_batch = cfg.sft_batch if cfg.hl == "sft" and not cfg.hl_init else 0
    batches = {"--batch-problems": cfg.batch_problems, "--sft-batch": sft_batch}
    device = grpo.init_distributed(cfg.device, batches)
    out, t_start = grpo.start_run(cfg), time.time()
    flags = changed_flags(cfg) or "the default, ~8 min on 2 CPU cores"
    print(f"HICRL experiment {cfg.exp} on {device}: {flags}")
    # --- models: the LL phi, p_ref = q = frozen phi_0; the HL theta, pi_SFT = frozen theta_0
    setting = dict(trainable=True, precision=cfg.precision, grad_ckpt=cfg.grad_ckpt)
    flag = "--ll-init" if cfg.ll_init else "--model"
    ll, tok = grpo.load_model(cfg.ll_init or cfg.model, device, flag=flag, **setting)
    ref, prior = context_grpo.make_prior(ll, cfg)  # copied before a resume loads phi_t
    models = {"ll": ll}
    opts = {"ll": torch.optim.AdamW(ll.parameters(), lr=cfg.lr, weight_decay=0.0)}
    eos = grpo.eos_token_ids(ll, tok)
    warnings = context_grpo.budget_warnings(cfg, tok, problems, eval_problems)
    hl, sft_model = None, None
    if cfg.hl in ("pretrained", "sft"):
        hl, warning = load_hl(cfg, tok, problems, eval_all, out, device)
        warnings += [warning] if warning else []
        sft_model = grpo.frozen_copy(hl)  # pi_SFT (the pretrained HL itself in experiments 2, 3)
        models["hl"] = hl
        opts["hl"] = torch.optim.AdamW(hl.parameters(), lr=cfg.hl_lr, weight_decay=0.0)
    kind, source, test_ctxs = contexts_without_hl(cfg, tok, problems, eval_problems)
    run = Run(cfg, out, ll, tok, eos, eval_problems, hl, test_ctxs, t_start)
    start = grpo.load_checkpoint(out, models, opts) if cfg.resume else 0
    # --- round 0, also on a resume killed before it: every later number has its baseline beside it
    if start == 0 and not any(r["step"] == 0 for r in run.evaluations()):
        run.evaluate(-1)
    if not (cfg.ll_steps or cfg.hl_steps):
        print(f"nothing to train in experiment {cfg.exp}: the evaluation above is the result")
        print("".join(w + "\n" for w in warnings), end="")
        return grpo.save_checkpoint(out, 0, models, opts, tok)
    for t in range(start, cfg.rounds):
        # --- 1. the LL phase, the HL fixed: each rollout's context from the HL, or `source`
        for k in range(cfg.ll_steps if t >= cfg.hl_first else 0):  # --hl-first: the HL phase alone
            idx = (t - cfg.hl_first) * cfg.ll_steps + k  # the LL steps taken before this one
            batch = run.draw(problems, idx, "data")
            n, purpose = (cfg.n_off, "demo") if cfg.icpo else (cfg.group_size, "ctx")
            if cfg.joint:
                record = joint_step(ll, ref, prior, hl, sft_model, opts, tok, batch, cfg, idx, eos)
            elif kind == "hl":
                ctx, _, _, stats = hl_generator.hl_contexts(
                    hl, tok, batch, n, cfg, eos, purpose, idx
                )
                record = {**run.ll_step(ref, prior, opts["ll"], batch, ctx, idx), **stats}
            else:
                ctx = source(batch, n, idx, purpose)
                record = run.ll_step(ref, prior, opts["ll"], batch, ctx, idx)
            run.log("ll", t, record, k, cfg.ll_steps)
        # --- 2. the HL phase, the LL fixed
        for k in range(cfg.hl_steps):
            idx = t * cfg.hl_steps + k
            batch = run.draw(problems, idx, "hl")
            record = hl_generator.hl_step(hl, sft_model, ll, opts["hl"], tok, batch, cfg, idx, eos)
            run.log("hl", t, record, k, cfg.hl_steps)
        # --- 3. evaluate, 4. checkpoint
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
            run.evaluate(t)
        grpo.save_checkpoint(out, t + 1, models, opts, tok)
    # --- the verdict: round 0 against the last evaluation
    minutes = (time.time() - t_start) / 60
    line = before_after(run.evaluations(), with_contexts=cfg.context_at != "none")
    print(line + f"; {minutes:.1f} min, logs in {out}" + "".join("; " + w for w in warnings))


@dataclass
class Run:
    """What the loop shares: drawing batches, one LL step, logging, evaluating."""

    cfg: Config
    out: str  # the run folder
    ll: object  # the LL, phi
    tok: object
    eos: list
    eval_problems: list
    test_hl: object  # the HL whose greedy contexts the evaluation uses, or None
    test_ctxs: list  # or the contexts it uses (retrieved, random), or None
    t_start: float

    def draw(self, problems, idx, purpose):
        """This rank's share of step idx's problems, from the LL's ("data") or the HL's stream."""
        cfg = self.cfg
        indices = grpo.batch_indices(len(problems), cfg.batch_problems, idx, cfg.seed, purpose)
        return grpo.my_share([problems[i] for i in indices])

    def ll_step(self, ref, prior, optimizer, batch, contexts, idx):
        """One LL update with these contexts (context_grpo.ll_round_step)."""
        args = (self.ll, ref, prior, optimizer, self.tok, batch, contexts, self.cfg, idx, self.eos)
        return context_grpo.ll_round_step(*args)[0]

    def log(self, phase, t, record, k=None, steps=None):
        """A record (a step's reduced over ranks; an evaluation is gathered) into metrics.jsonl."""
        if k is not None:
            record = grpo.reduce_record(record)
        named = {f"{phase}/{n}": v for n, v in record.items() if n != "step"}
        grpo.log_jsonl(self.out, "metrics.jsonl", {"step": t + 1, "phase": phase, **named})
        if k is not None:
            prefix = f"round {t + 1}/{self.cfg.rounds} {phase} step"
            context_grpo.print_record(prefix, {**record, "step": k + 1}, steps)

    def evaluate(self, t):
        """Accuracy on the held-out problems with the test contexts: eval.json, metrics.jsonl."""
        cfg = self.cfg
        settings = replace(cfg, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens)
        out_file = f"{self.out}/eval_round{t + 1}.jsonl"
        where = dict(hl=self.test_hl, contexts=self.test_ctxs, out_file=out_file)
        s = evaluate(self.ll, self.tok, self.eval_problems, self.eos, settings, **where)
        print_summary(s)
        s.update(rounds=t + 1, exp=cfg.exp, flags=changed_flags(cfg))
        s["wall_clock"] = time.time() - self.t_start
        self.log("eval", t, {k: v for k, v in s.items() if not isinstance(v, (dict, str))})
        grpo.write_json(os.path.join(self.out, "eval.json"), s)

    def evaluations(self):
        """The logged evaluations, round 0 first."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        return [r for r in grpo.read_jsonl(path) if r["phase"] == "eval"]


if __name__ == "__main__":
    main(grpo.parse_config(Config))
