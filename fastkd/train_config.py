"""Every option of `fastkd train` as one dataclass (TrainConfig): its flags, its YAML file and the saved
<out>/config.yaml all come from the fields (fastkd.config); `TrainConfig.make(overrides={...})` builds one."""

from __future__ import annotations

from dataclasses import dataclass

from fastkd.config import CHAT_TEMPLATE, DEVICE, DTYPE, PROGRESS, SEED, StageConfig
from fastkd.config import option as _opt
from fastkd.errors import UserError
from fastkd.paths import BBH_DIR_LOOKUP
from fastkd.templates import LOSS_TURNS


@dataclass
class TrainConfig(StageConfig):
    """Every option of `fastkd train`, with its default; the one source of truth for the CLI."""

    # data
    cache: str | None = _opt(None, "teacher cache folder (from `fastkd cache-teacher`): offline KD")
    data: str | None = _opt(None, "records (.jsonl/.json/.parquet) used instead of a cache: online KD with --teacher, "
                                  "SFT without")
    eval_cache: str | None = _opt(None, "held-out cache evaluated every --eval-every steps; without one, "
                                        "--eval-sequences are held out of the training source")
    eval_data: str | None = _opt(None, "held-out records, when training from records")
    eval_sequences: int = _opt(0, "sequences held out from the training source for evaluation (seeded), when no eval "
                                  "cache/data is given", minimum=0)
    cot: bool = _opt(True, "records: response = rationale + answer (a record with \"cot\": false is answer-only "
                           "anyway)")
    chat_template: bool = CHAT_TEMPLATE()
    max_length: int | None = _opt(2048, "records: longest sequence in tokens (longer ones are truncated); with "
                                        "--packing, the length of a packed row", minimum=1)
    messages_field: str = _opt("messages", "records: key holding a conversation (messages form), as in cache-teacher")
    loss_turns: str = _opt("all", "records in messages form: the assistant turns that carry loss: all, last, "
                                  "reasoning or answer", choices=list(LOSS_TURNS))
    packing: bool = _opt(False, "concatenate whole sequences into rows of --max-length tokens (--batch-size rows per "
                                "micro-batch), attention kept inside each sequence (position ids restart per "
                                "sequence): almost no padding; a cached sequence longer than a row is refused")
    # models
    student: str | None = _opt(None, "student: a local folder or hub id (AutoModelForCausalLM)")
    student_config: str | None = _opt(None, "train from scratch: a config.json (or folder holding one) for AutoConfig")
    tokenizer: str | None = _opt(None, "tokenizer folder or hub id (default: the student's)")
    teacher: str | None = _opt(None, "live teacher for online KD (with --data, no cache)")
    teacher_dtype: str = DTYPE("online teacher")
    top_k: int = _opt(64, "online KD: teacher log-probs kept per position (as a cache would)", minimum=1)
    teacher_layers: list[int] | None = _opt(None, "online KD: teacher hidden-state indices for the hidden loss "
                                                  "(0 = embeddings)")
    student_layers: list[int] | None = _opt(None, "student hidden-state indices paired with the teacher layers "
                                                  "(default: proportional depth)")
    # loss
    mode: str = _opt("tail", "KL mode: tail (top-k + exact tail bucket), renorm (top-k renormalised), sampled (cache "
                             "made with --sample)", choices=["tail", "renorm", "sampled"])
    ce_weight: float = _opt(1.0, "weight of the cross-entropy on the data tokens", minimum=0)
    kl_weight: float = _opt(1.0, "weight of the KL to the teacher (0 = SFT baseline)", minimum=0)
    hidden_weight: float = _opt(0.0, "weight of the hidden-state MSE through learned projections (saved with the "
                                     "student)", minimum=0)
    temperature: float = _opt(1.0, "distillation temperature", exclusive_minimum=0)
    loss_impl: str = _opt("auto", "fused: fused linear + loss, no [rows, V] logits; logits: materialise the logits and "
                                  "write the gradient over them; auto: fused (the lightest on CPU and CUDA) unless the "
                                  "student's logits are not lm_head(hidden); the choice is printed",
                          choices=["auto", "logits", "fused"])
    chunk_size: int | None = _opt(None, "rows per chunk inside the loss (memory bound); default: the kernel's",
                                  minimum=1)
    cross_tokenizer: str | None = _opt(None, "a student whose tokenizer differs from the cache's: uld (CE + "
                                             "--kl-weight x the sorted-probability L1, rows aligned by index) or "
                                             "exact (top-k ids mapped to identical student strings where both tokens "
                                             "start at the same character)", choices=["uld", "exact"])
    teacher_tokenizer: str | None = _opt(None, "--cross-tokenizer with a cache made before fastkd saved the teacher "
                                               "tokenizer in it: the teacher tokenizer (checked against the cache's "
                                               "identity)")
    # LoRA (peft)
    lora_rank: int = _opt(0, "train rank-r LoRA adapters on a frozen student instead of every weight (0 = full "
                             "training; needs peft)", minimum=0)
    lora_alpha: float | None = _opt(None, "LoRA scaling alpha (default: 2 x --lora-rank)", exclusive_minimum=0)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA inputs", minimum=0, exclusive_maximum=1)
    lora_targets: str = _opt("all-linear", "modules that get adapters: all-linear (every linear layer but the output "
                                           "head) or a comma list of module names, e.g. q_proj,k_proj,v_proj,o_proj")
    # optimisation
    lr: float = _opt(1e-4, "peak learning rate (AdamW)", exclusive_minimum=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", minimum=0)
    adam_beta1: float = _opt(0.9, "AdamW beta1", minimum=0, exclusive_maximum=1)
    adam_beta2: float = _opt(0.95, "AdamW beta2", minimum=0, exclusive_maximum=1)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", exclusive_minimum=0)
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", choices=["cosine", "linear", "constant"])
    warmup_steps: int = _opt(0, "linear warmup steps", minimum=0)
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine, linear)", minimum=0, maximum=1)
    max_steps: int | None = _opt(None, "optimizer steps to run (default: --epochs worth)", minimum=1)
    epochs: float = _opt(1.0, "epochs over the training source, when --max-steps is not given", exclusive_minimum=0)
    batch_size: int = _opt(8, "sequences per micro-batch on each process (with --packing: rows of --max-length "
                              "tokens)", minimum=1)
    grad_accum: int = _opt(1, "micro-batches per optimizer step (global batch = batch_size x processes x grad_accum)",
                           minimum=1)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)", minimum=0)
    precision: str = _opt("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=["auto", "bf16", "fp32"])
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory, ~30%% slower)")
    # loader
    seed: int = SEED("data order, initialisation and sampling")
    shuffle_buffer: int = _opt(256, "shuffle-buffer size (sequences) over the stream of cache blocks; decoded blocks "
                                    "it spans stay in memory (records from --data are always fully shuffled)",
                               minimum=0)
    group_batches: int = _opt(32, "batches per length-grouping window (larger = less padding, less randomness; "
                                  "tasks of different lengths then fill batches of their own: 1 mixes them; 0 "
                                  "counts as 1)", minimum=0)
    num_workers: int = _opt(0, "DataLoader worker processes decoding the cache (0: the read-ahead thread decodes)",
                            minimum=0)
    prefetch: int = _opt(4, "steps built ahead by a background thread (decode, collate, pin) in a bounded queue; "
                            "0 = decode on the training thread", minimum=0)
    verify_cache: bool = _opt(True, "check every cache block against its sha256 before decoding it (cost: see "
                                    "benchmarks/cache_io.py); --no-verify-cache trains on bytes nobody checked (a "
                                    "warning says so)")
    skip_corrupt_blocks: bool = _opt(False, "before training, check every cache block and leave out the ones that fail "
                                            "their digests (counted and named); without it a corrupt block stops "
                                            "training")
    # run
    out: str = _opt("runs/train", "run folder: config.yaml, metrics.jsonl, checkpoint/, final/")
    resume: bool = _opt(False, "continue from <out>/checkpoint exactly where it stopped", once=True)
    overwrite: bool = _opt(False, "delete the run already in --out (its checkpoint, metrics, final model) and start "
                                  "over; without it (or --resume) a folder holding a run is refused", once=True)
    device: str = DEVICE()
    distributed: str = _opt("ddp", "engine under torchrun", choices=["ddp", "fsdp"])
    log_every: int = _opt(10, "steps between metric lines (0 counts as 1)", minimum=0)
    eval_every: int = _opt(0, "steps between held-out evaluations (0 = only before and after training)", minimum=0)
    eval_batches: int | None = _opt(None, "cap on held-out batches per evaluation (default: all)", minimum=1)
    eval_bbh_tasks: str | None = _opt(None, "also score the student on these BBH tasks at every evaluation (comma list "
                                            "or a group, as in eval-bbh --tasks), logged as eval_bbh_strict / "
                                            "eval_bbh_lenient")
    eval_bbh_limit: int = _opt(20, "BBH items per task for --eval-bbh-tasks (the first ones of each task)", minimum=1)
    eval_bbh_max_new_tokens: int = _opt(256, "generation budget per BBH item for --eval-bbh-tasks", minimum=1)
    bbh_dir: str | None = _opt(None, "BBH data folder for --eval-bbh-tasks (default: " + BBH_DIR_LOOKUP + ", then the "
                                     "hub)")
    save_every: int = _opt(0, "also save a checkpoint every N steps (0 = by time only)", minimum=0)
    save_every_minutes: float = _opt(10.0, "minutes between checkpoints, so a run killed at any moment loses at most "
                                           "this much (0 = off); SIGTERM/SIGINT also save one and stop", minimum=0)
    save_final: bool = _opt(True, "save the final student with save_pretrained (+ tokenizer, projector) in <out>/final")
    progress: bool = PROGRESS()
    tensorboard: bool = _opt(True, "write TensorBoard events when tensorboard is installed")

    def validate(self) -> "TrainConfig":
        """The checks between options (each option's own range is checked as the config is built)."""
        cross = self.cross_tokenizer
        checks = [
            (not (self.cache or self.data), "give --cache (offline KD) or --data (online KD with --teacher, or SFT)"),
            (self.cache and self.data, "give either --cache or --data, not both"),
            (not (self.student or self.student_config),
             "give --student (a model folder or hub id) or --student-config (from scratch)"),
            (self.student and self.student_config, "give either --student or --student-config, not both"),
            (self.student_config and not self.tokenizer,
             "--student-config needs --tokenizer (a from-scratch student has no tokenizer of its own)"),
            (self.data and not self.teacher and (self.kl_weight or self.hidden_weight),
             "--data without --teacher trains SFT: set --kl-weight 0 and --hidden-weight 0, or give --teacher for "
             "online KD"),
            (self.teacher and self.mode == "sampled",
             "--mode sampled reads ids sampled at cache time; online KD (--teacher) uses --mode tail or renorm"),
            (self.cache and self.teacher, "--teacher is for online KD from --data; with --cache the teacher is already "
                                          "cached"),
            (self.skip_corrupt_blocks and not self.verify_cache,
             "--skip-corrupt-blocks needs the digests: drop --no-verify-cache"),
            (self.resume and self.overwrite,
             "--resume continues the run in --out and --overwrite deletes it: give one of them"),
            (self.lora_rank and self.distributed == "fsdp",
             "--lora-rank with --distributed fsdp is not supported; use --distributed ddp"),
            (self.packing and not self.max_length,
             "--packing packs sequences into rows of --max-length tokens: give --max-length"),
            (self.packing and cross, f"--packing with --cross-tokenizer {cross} is not supported (the student's token "
                                     f"counts are known only once a sequence is re-tokenised); drop one of them"),
            (cross and not self.cache, f"--cross-tokenizer {cross} distils from a teacher cache: give --cache"),
            (cross and self.hidden_weight,
             "--cross-tokenizer: hidden states are not aligned across tokenizers; set --hidden-weight 0"),
            (cross and self.mode != "tail",
             f"--cross-tokenizer {cross} uses the top-k values and the exact tail: use --mode tail (not {self.mode})"),
            (cross == "uld" and self.temperature != 1.0,
             "--cross-tokenizer uld compares the cached (temperature 1) probabilities: use --temperature 1"),
            (self.teacher_tokenizer and not cross, "--teacher-tokenizer is read only with --cross-tokenizer uld|exact"),
        ]
        for bad, message in checks:
            if bad:
                raise UserError(message)
        return self
