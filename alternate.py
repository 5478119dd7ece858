"""
alternate.py: hierarchical in-context RL, the alternating optimisation of DESIGN.md §6, the five
experiments, every ablation. This is the command to run.

    python alternate.py                                   # exp 5, embedded SmolLM2-135M, offline, CPU, minutes
    python alternate.py --model Qwen2.5-0.5B --data ../shared/data/math_train.jsonl \\
        --eval-data ../shared/data/math500.jsonl --rounds 20 --group-size 8 --max-new-tokens 512 \\
        --max-context-tokens 384                            # one GPU, MATH's token budgets
    python alternate.py --exp 3 --lam 0                   # an experiment with an ablation
    python alternate.py --resume runs/alternate           # continue a run
    torchrun --standalone --nproc_per_node 8 alternate.py --model Qwen2.5-0.5B --batch-problems 16 ...  # 8 GPUs

    theta_0 <- SFT on D_SFT (or --hl-init DIR);  phi_0 <- --ll-init DIR (an exp-1 checkpoint) or the base
    model;  q = p_ref = frozen phi_0;  pi_SFT = frozen theta_0.
    for t = 1..T (--rounds):
        1. LL update(s), theta fixed:  r = R_task + lambda * U~,  GRPO with context     (context_grpo.ll_step)
        2. HL update(s), phi fixed:    R_HL, KL to pi_SFT                              (hl_generator.hl_step)
        3. every --eval-every rounds: accuracy on the held-out problems, with context at test time
        4. log (ll/, hl/, eval/ in metrics.jsonl) and checkpoint (ckpt/ll, ckpt/hl)

| exp | HL         | LL training | context      |  flags it sets (each overridable)
|   1 | none       | GRPO        | none         |  --hl none --context-at none
|   2 | pretrained | frozen      | test only    |  --hl pretrained --ll-steps 0 --hl-steps 0 --context-at test
|   3 | pretrained | GRPO        | train + test |  --hl pretrained --context-at train+test (the HL is RL-trained
|     |            |             |              |  from the pretrained model, --hl-steps 1; --hl-steps 0 keeps it)
|   4 | SFT        | frozen      | test only    |  --hl sft --ll-steps 0 --hl-steps 0 --context-at test
|   5 | SFT        | GRPO        | train + test |  --hl sft --context-at train+test

Ablations, one flag each: --lam 0 (no utilisation reward), --prior {init,base,self} (q; base needs --base-model
or --ll-init), --beta 0 (no KL to p_ref), --alpha 0 (task-only HL reward), --beta-hl 0 (no KL to pi_SFT), --joint
(one combined step per round instead of alternating), --frozen-ll (the LL never moves; the HL still learns
against it).
--icpo trains the LL by ICPO instead, with the HL's contexts as the demonstrations (DESIGN §7).

Deviations, numbered:
    1. In experiments 2 and 4 the HL is not RL-trained (--hl-steps 0): they measure test-time context
       alone; the frozen-LL ablation of exp 5 (--frozen-ll) is the one where the HL learns against a fixed LL.
    2. --joint: each round, one step where the HL's contexts are sampled once, the LL is updated on its
       rollouts with them, and the HL is updated on R_HL of those same rollouts (M = 1 answer per context).
"""
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

import context_grpo
import grpo
import hl_generator
from eval_math500 import evaluate, print_summary
from grpo import arg

TABLE = __doc__[__doc__.index("| exp"):__doc__.index("Ablations, one flag each")]
EXPERIMENTS = {  # the table above: the defaults that --exp sets
    1: dict(hl="none", context_at="none", ll_steps=2, hl_steps=0),
    2: dict(hl="pretrained", context_at="test", ll_steps=0, hl_steps=0),
    3: dict(hl="pretrained", context_at="train+test", ll_steps=2, hl_steps=1),
    4: dict(hl="sft", context_at="test", ll_steps=0, hl_steps=0),
    5: dict(hl="sft", context_at="train+test", ll_steps=2, hl_steps=1),
}


@dataclass
class Config(hl_generator.Config, context_grpo.Config):
    HIDDEN = ("steps", "context", "ll_model", "n_show", "sample_every", "save_every", "bonus_steps")  # derived / unused
    EPILOG = TABLE  # --help shows the experiment table
    model: str = arg("smollm2", "the LL (and the HL's base, unless --hl-model): smollm2, Qwen2.5-0.5B, a hub id or a folder")
    exp: int = field(default=5, metadata={"help": "experiment 1-5 (the table in this file's docstring)",
                                          "choices": [1, 2, 3, 4, 5]})
    hl: str = field(default="", metadata={"help": "HL: none, pretrained, sft ('' = from --exp)",
                                          "choices": ["", "none", "pretrained", "sft"]})
    context_at: str = field(default="", metadata={"help": "where the LL sees HL contexts ('' = from --exp)",
                                                  "choices": ["", "none", "test", "train+test"]})
    rounds: int = arg(2, "T: rounds of (LL phase, HL phase)", ge=1)
    ll_steps: int = arg(-1, "LL steps per round (-1 = from --exp)", ge=-1)
    hl_steps: int = arg(-1, "HL steps per round (-1 = from --exp)", ge=-1)
    frozen_ll: bool = arg(False, "ablation: the LL never updates (the HL still does)")
    joint: bool = arg(False, "ablation: one combined LL+HL step per round instead of alternating phases")
    hl_model: str = arg("", "HL base model (default: --model)")
    hl_init: str = arg("", "an SFT'd HL folder: theta_0 without running SFT")
    ll_init: str = arg("", "an exp-1 checkpoint folder: phi_0 (default: --model)")
    hl_lr: float = arg(1e-5, "HL learning rate", gt=0)
    eval_data: str = arg("", "held-out problems: a JSONL path (e.g. MATH-500), a built-in test split, or math500 (hub); "
                             "default: the test split of a built-in --data (ops-test for ops), else math500; training "
                             "problems that are also here are removed")
    eval_limit: int = arg(16, "evaluate on the first N held-out problems (0 = all)", ge=0)
    eval_every: int = arg(1, "evaluate every N rounds (and after the last)", ge=1)
    eval_max_new_tokens: int = arg(0, "LL budget at evaluation (0 = --max-new-tokens)", ge=0)
    out: str = arg("runs/alternate", "run folder: config.json, metrics.jsonl, samples.jsonl, eval*.json*, ckpt/")
    # smaller defaults than the single-level scripts: a complete exp-5 run on a CPU in minutes
    group_size: int = arg(4, "G: LL rollouts per problem (each with its own HL context)", ge=2)
    max_new_tokens: int = arg(48, "LL completion budget", ge=1)
    max_context_tokens: int = arg(64, "HL context budget", ge=1)
    hl_group: int = arg(4, "G_HL: contexts per problem in the HL update", ge=2)
    ll_answers: int = arg(1, "M: LL answers per context in the HL update", ge=1)
    sft_steps: int = arg(20, "SFT steps for theta_0", ge=1)
    sft_batch: int = arg(4, "SFT pairs per step", ge=1)

    def check(self):
        """Ranges, models, and contradictory flags (after --exp has filled in its defaults): one clear message
        before any data or model is loaded."""
        self.bonus_steps = self.bonus_steps or experiment_defaults(self)["steps"]  # ICPO's T, fixed at the start
        super().check()
        self.eval_data = self.eval_data or grpo.HELDOUT.get(self.data, "math500")
        cfg = replace(self, **experiment_defaults(self))
        if cfg.hl == "none" and (cfg.hl_steps > 0 or cfg.joint or cfg.context_at != "none"):
            raise SystemExit("--hl none: there is no HL to train or to give contexts (set --hl-steps 0, "
                             "--context-at none, no --joint)")
        if self.exp in (2, 4) and cfg.ll_steps > 0:
            raise SystemExit(f"--exp {self.exp} keeps the LL frozen (that is the experiment): --ll-steps {cfg.ll_steps} "
                             f"would train it; for a trained LL with test-time contexts only, take --exp "
                             f"{self.exp + 1} --context-at test")
        if cfg.joint and (cfg.icpo or cfg.ll_steps == 0):
            raise SystemExit("--joint needs LL steps (not --frozen-ll / --ll-steps 0) and is not combined with --icpo")


def experiment_defaults(cfg):
    """The fields --exp sets, for those the user left at '' / -1; --frozen-ll forces 0 LL steps."""
    table = EXPERIMENTS[cfg.exp]
    out = {k: (table[k] if getattr(cfg, k) in ("", -1) else getattr(cfg, k)) for k in table}
    if cfg.frozen_ll:
        out["ll_steps"] = 0
    out["steps"] = cfg.rounds * max(out["ll_steps"], 1)  # total LL steps (ICPO's bonus anneals over them)
    return out


def changed_flags(cfg):
    """The flags that differ from the defaults of cfg's experiment, as "name=value, ..." (for the report); not
    the fields derived from others (steps, the hidden ones; eval_data when it is --data's test split)."""
    base = {**asdict(Config()), **experiment_defaults(Config(exp=cfg.exp)),
            "eval_data": grpo.HELDOUT.get(cfg.data, "math500")}
    skip = {"out", "resume", "overwrite", "device", "exp", *Config.HIDDEN}
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items() if k not in skip and base.get(k) != v)


def hl_contexts(hl, tok, batch, n, cfg, idx, eos, purpose):
    """n contexts per problem from the HL (never greedy: the G rollouts need their own), for the LL phase
    (purpose "ctx") or as ICPO's demonstrations ("demo"). Returns (contexts, hl prompts, hl completions, stats)."""
    return hl_generator.generate_contexts(hl, tok, batch, n, cfg.max_context_tokens, cfg.hl_temperature or 1.0, eos,
                                          seed=grpo.stream_seed(cfg.seed, purpose, idx),
                                          self_threshold=cfg.self_threshold)


def ll_contexts(hl, tok, batch, n, cfg, idx, eos, demos=None):
    """The contexts of one LL step, n per problem: from the HL when there is one (parse rate and ctx_self in
    the stats), else ICPO's random training demonstrations (`demos`, a context source), else none.
    Returns (contexts, stats)."""
    if hl is not None:
        contexts, _, _, stats = hl_contexts(hl, tok, batch, n, cfg, idx, eos, "demo" if demos else "ctx")
    else:
        contexts, stats = demos(batch, n, idx) if demos else [[None] * n for _ in batch], {}
    if demos:  # ll_step fits its own contexts to --max-prompt-tokens; ICPO's demonstrations are fitted here
        contexts = grpo.fit_contexts(tok, batch, contexts, cfg.max_prompt_tokens)[0]
    return contexts, stats


def joint_step(ll, ref, prior, hl, sft_model, ll_opt, hl_opt, tok, batch, cfg, idx, eos):
    """The --joint ablation: contexts sampled once; LL updated on its rollouts with them (§3.2, §4); HL
    updated on R_HL of the same rollouts, one answer per context (§5)."""
    ctx, hl_prompts, hl_comps, ctx_stats = hl_contexts(hl, tok, batch, cfg.group_size, cfg, idx, eos, "ctx")
    record, roll = context_grpo.ll_step(ll, ref, prior, ll_opt, tok, batch, ctx, cfg, idx, eos)
    logp, mask = grpo.pad_completions(roll["sampler_logp"], value=0.0)
    r_hl = hl_generator.hl_reward(roll["acc"] + cfg.format_bonus * roll["wrote_box"], logp, mask, cfg.alpha)
    hl_stats = hl_generator.hl_update(hl, sft_model, hl_opt, hl_prompts, hl_comps, r_hl, cfg, cfg.group_size)
    record.update({f"hl_{k}": v for k, v in hl_stats.items()}, hl_reward=r_hl.mean().item(), **ctx_stats)
    return record, roll


def load_hl(cfg, tok, problems, held, out, device):
    """theta_0: the pretrained HL, --hl-init, or SFT on D_SFT (saved to OUT/hl_sft, reused on resume). D_SFT
    never holds a held-out problem (the evaluation problems, and --holdout), neither as x nor as x'."""
    sft_dir = os.path.join(out, "hl_sft")
    if cfg.hl == "sft" and not cfg.hl_init and os.path.exists(os.path.join(sft_dir, "config.json")):
        print(f"theta_0: the SFT'd HL already in {sft_dir}")
        return grpo.load_model(sft_dir, device=device, trainable=True, precision=cfg.precision,
                               grad_ckpt=cfg.grad_ckpt)[0]
    hl, _ = grpo.load_model(cfg.hl_init or cfg.hl_model or cfg.model, device=device, trainable=True,
                            precision=cfg.precision, grad_ckpt=cfg.grad_ckpt,
                            flag="--hl-init" if cfg.hl_init else "--hl-model" if cfg.hl_model else "--model")
    if cfg.hl == "sft" and not cfg.hl_init:
        pairs = hl_generator.build_sft_pairs(problems, held)
        print(f"theta_0: SFT of the HL on D_SFT ({len(pairs)} pairs)")
        hl_generator.sft(hl, tok, pairs, cfg, tok.eos_token_id)
        hl_generator.save_model(hl, tok, sft_dir)
    return hl.eval()


def main(cfg):
    cfg = replace(cfg, **experiment_defaults(cfg))  # flags were checked by parse_config (Config.check)
    # -------------------------------------------------------------------------- data, before any model
    # eval-set hygiene: no training problem (LL or D_SFT) is an evaluation problem, whatever --eval-limit keeps;
    # one evaluation set whatever the seed: the order of eval_math500.py --limit (seed 0 for a built-in test split)
    eval_all = grpo.load_problems(cfg.eval_data)
    eval_problems = eval_all[:cfg.eval_limit] if cfg.eval_limit else eval_all
    held = eval_all + (grpo.load_problems(cfg.holdout) if cfg.holdout else [])
    problems = grpo.drop_overlap(grpo.load_problems(cfg.data, cfg.limit or None, cfg.seed, sample=True), held)
    # under torchrun each rank takes its share of every batch (and of the evaluation); rank 0 alone writes, prints
    device = grpo.init_distributed(grpo.pick_device(cfg.device))
    grpo.check_divides(cfg.batch_problems)
    if cfg.hl == "sft" and not cfg.hl_init:
        grpo.check_divides(cfg.sft_batch, "--sft-batch")
    out = grpo.start_run(cfg)
    train_ll, use_hl = cfg.ll_steps > 0, cfg.hl != "none"
    test_ctx, train_ctx = use_hl and cfg.context_at in ("test", "train+test"), use_hl and cfg.context_at == "train+test"
    print(f"HICRL experiment {cfg.exp}: HL {cfg.hl}, LL {'GRPO' if train_ll else 'frozen'}, context {cfg.context_at}; "
          f"{cfg.rounds} rounds x ({cfg.ll_steps} LL + {cfg.hl_steps} HL steps"
          f"{', joint' if cfg.joint else ''}), {cfg.batch_problems} problems x {cfg.group_size} rollouts, "
          f"eval on {cfg.eval_limit or 'all'} problems of {cfg.eval_data} every {cfg.eval_every} round(s); device {device}. "
          + (f"ICPO's demonstrations: {'the HL' if train_ctx else 'random training pairs'}. " if cfg.icpo else "")
          + ("With the embedded SmolLM2 on a 2-core CPU this default takes about 5 minutes."
             if device == "cpu" and cfg.exp == 5 and not changed_flags(cfg) and not cfg.resume else ""))
    t_start = time.time()
    # -------------------------------------------------------------------------- models
    ll, tok = grpo.load_model(cfg.ll_init or cfg.model, device=device, trainable=True, precision=cfg.precision,
                              grad_ckpt=cfg.grad_ckpt,
                              flag="--ll-init" if cfg.ll_init else "--model")
    ll.eval()
    ref = grpo.frozen_copy(ll) if (cfg.beta > 0 or cfg.prior == "init") else None  # p_ref = q = frozen phi_0
    prior = context_grpo.make_prior(cfg.prior, ll, ref, cfg)
    ref = ref if cfg.beta > 0 else None
    ll_opt = torch.optim.AdamW(ll.parameters(), lr=cfg.lr, weight_decay=0.0)
    problems = grpo.fit_prompts(tok, problems, cfg.max_prompt_tokens)
    eos = grpo.eos_token_ids(ll, tok)
    models, opts = {"ll": ll}, {"ll": ll_opt}
    hl = sft_model = hl_opt = None
    if use_hl:
        hl = load_hl(cfg, tok, problems, held, out, device)
        sft_model = grpo.frozen_copy(hl)  # pi_SFT (the pretrained HL itself in experiments 2 and 3)
        hl_opt = torch.optim.AdamW(hl.parameters(), lr=cfg.hl_lr, weight_decay=0.0)
        models["hl"], opts["hl"] = hl, hl_opt
    start = grpo.load_checkpoint(out, models, opts) if cfg.resume else 0
    hl_steps = 0 if cfg.joint else cfg.hl_steps
    random_demos = context_grpo.context_source("random", problems, cfg.seed)  # ICPO without HL contexts
    steps_left, t_loop, done = (cfg.rounds - start) * (cfg.ll_steps + hl_steps), time.time(), 0
    eval_s = 0.0  # seconds spent evaluating since t_loop: not training time

    def eta():
        per_step = (time.time() - t_loop - eval_s) / done
        return f"  ~{per_step * (steps_left - done):.0f}s of training steps left (evaluation aside)"

    def log(phase, t, record):  # rank 0 writes
        grpo.log_jsonl(out, "metrics.jsonl", {"step": t + 1, "phase": phase,
                                              **{f"{phase}/{k}": v for k, v in record.items() if k != "step"}})

    def run_eval(t):
        nonlocal eval_s
        t0 = time.time()
        s = evaluate(ll, tok, eval_problems, eos, hl if test_ctx else None, max_new_tokens=cfg.eval_max_new_tokens
                     or cfg.max_new_tokens, max_context_tokens=cfg.max_context_tokens, batch_size=16, seed=cfg.seed,
                     out_file=os.path.join(out, f"eval_round{t + 1}.jsonl"), self_threshold=cfg.self_threshold)
        print_summary(s)
        s.update(rounds=t + 1, wall_clock=time.time() - t_start, exp=cfg.exp, flags=changed_flags(cfg))
        log("eval", t, {k: v for k, v in s.items() if not isinstance(v, (dict, str))})
        grpo.write_json(os.path.join(out, "eval.json"), s)
        eval_s += time.time() - t0

    if start == 0 and not cfg.resume:
        run_eval(-1)  # round 0: the starting point, so every later number has its baseline beside it
    if cfg.ll_steps == 0 and hl_steps == 0:
        print(f"nothing to train in this configuration (experiment {cfg.exp}): the evaluation above is the result")
        grpo.save_checkpoint(out, 0, models, opts, tok)
        return
    for t in range(start, cfg.rounds):
        # ---------------------------------------------------------------------- 1. LL phase, HL fixed
        for k in range(cfg.ll_steps):
            idx = t * cfg.ll_steps + k
            batch = [problems[i] for i in grpo.batch_indices(len(problems), cfg.batch_problems, idx, cfg.seed)]
            batch = grpo.my_share(batch)  # this rank's problems (all of them in one process)
            if cfg.joint:
                record, roll = joint_step(ll, ref, prior, hl, sft_model, ll_opt, hl_opt, tok, batch, cfg, idx, eos)
            elif cfg.icpo:  # n_off demonstrations per problem, sampled with, trained without (§7)
                demos, ctx_stats = ll_contexts(hl if train_ctx else None, tok, batch, cfg.n_off, cfg, idx, eos,
                                               random_demos)
                record, roll = context_grpo.icpo_step(ll, ref, ll_opt, tok, batch, demos, cfg, idx, eos)
                record.update(ctx_stats)
            else:  # each rollout its own context c_i ~ pi_theta(. | x), or none
                contexts, ctx_stats = ll_contexts(hl if train_ctx else None, tok, batch, cfg.group_size, cfg, idx, eos)
                record, roll = context_grpo.ll_step(ll, ref, prior, ll_opt, tok, batch, contexts, cfg, idx, eos)
                record.update(ctx_stats)
            done += 1
            record = grpo.reduce_record(record)  # under torchrun: the mean over ranks, as one process's would read
            log("ll", t, record)
            grpo.print_record(f"round {t + 1}/{cfg.rounds} ll step", {**record, "step": k + 1}, cfg.ll_steps)
            print(eta())
        # ---------------------------------------------------------------------- 2. HL phase, LL fixed
        for k in range(hl_steps):
            idx = t * cfg.hl_steps + k
            batch = [problems[i] for i in grpo.batch_indices(len(problems), cfg.batch_problems, idx, cfg.seed + 1)]
            record, roll = hl_generator.hl_step(hl, sft_model, ll, hl_opt, tok, grpo.my_share(batch), cfg, idx, eos)
            done += 1
            record = grpo.reduce_record(record)
            log("hl", t, record)
            grpo.print_record(f"round {t + 1}/{cfg.rounds} hl step", {**record, "step": k + 1}, cfg.hl_steps)
            print(eta())
        # ---------------------------------------------------------------------- 3. evaluate, 4. checkpoint
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.rounds:
            run_eval(t)
        grpo.save_checkpoint(out, t + 1, models, opts, tok)
    evals = [r for r in grpo.read_jsonl(os.path.join(out, "metrics.jsonl")) if r["phase"] == "eval"]
    first, last = evals[0], evals[-1]
    leak = f"; contexts that carried the answer: {last['eval/ctx_has_answer']:.2f}" if test_ctx else ""
    print(f"before/after: accuracy {first['eval/acc']:.3f} at round 0 -> {last['eval/acc']:.3f} after round "
          f"{last['step']} [{last['eval/ci_low']:.3f}, {last['eval/ci_high']:.3f}] on {last['eval/n']} problems{leak}")
    print(f"done in {(time.time() - t_start) / 60:.1f} min: {out}/metrics.jsonl, {out}/eval.json, checkpoints in {out}/ckpt/")


if __name__ == "__main__":
    main(grpo.parse_config(Config))
