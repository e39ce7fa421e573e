"""The settings of `fa-bench` and `fa-export`: one object each, built from the command line (or the Python API)
and passed down whole. `validate()` checks every value before any work starts and names the flag at fault."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from fa_train.errors import SettingsError, check_output_dir, check_output_file

PAPER_STEPS = (1, 3, 5, 10)
THREATS = ("transfer", "whitebox", "differential")  # fa_deploy/robustness/threats.py: who attacks what


def parse_threats(value) -> Tuple[str, ...]:
    """`--threat`: 'all', one threat, or a comma-separated list, in THREATS order."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    names = set()
    for v in value:
        if v == "all":
            names.update(THREATS)
        elif v in THREATS:
            names.add(v)
        else:
            raise ValueError(f"unknown threat {v!r}; choose from {', '.join(THREATS)} or all")
    if not names:
        raise ValueError(f"no threat given; choose from {', '.join(THREATS)} or all")
    return tuple(t for t in THREATS if t in names)


def flag_of(name: str) -> str:
    return "--" + {"json_path": "json", "md_path": "markdown", "vis_dir": "visualize", "report_dir": "report",
                   "out_dir": "out", "dynamic": "dynamic-batch", "sanity_dir": "sanity"}.get(name, name).replace("_", "-")


def _positive_int(obj, name, minimum=1, optional=False):
    v = getattr(obj, name)
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise SettingsError(f"{flag_of(name)} {v}: must be an integer >= {minimum}")


def _img_size(v):
    if v is not None and (not isinstance(v, int) or v < 32 or v % 32):
        raise SettingsError(f"--img-size {v}: must be a positive multiple of 32")


def _data_spec(v, flag="--data"):
    if v is None:
        return
    from fa_train.data import DataError, parse_data_spec

    try:
        parse_data_spec(v)
    except DataError as e:
        raise SettingsError(str(e).replace("--data", flag, 1)) from None


@dataclass
class BenchSettings:
    """fa-bench: robustness rows for `weights`, or with `backends` the deployment harness against one source."""

    weights: Tuple[str, ...]
    backends: Tuple[str, ...] = ()
    attack: str = "pgd"
    eps: float = 0.03
    steps: Tuple[int, ...] = PAPER_STEPS
    data: Optional[str] = None
    test_split: Optional[str] = None
    img_size: Optional[int] = None
    batch_size: int = 16
    max_images: Optional[int] = None
    workers: int = 1
    device: str = "auto"
    json_path: Optional[str] = None
    md_path: Optional[str] = None
    max_drop: float = 0.02
    max_deploy_misses: Optional[float] = 0.1
    min_clean_ap: float = 0.05
    max_drift: Optional[float] = None  # --backend: per output, relative drift from the source; None: per precision
    threat: Optional[str] = None  # --backend: transfer, whitebox, differential, a list, or all (None: all)
    diff_weight: float = 1.0
    detect_score: float = 0.25
    cache_dir: Optional[str] = None
    vis_dir: Optional[str] = None
    num_vis: int = 4
    report_dir: Optional[str] = None
    quiet: bool = False
    cross_model: bool = False
    providers: Tuple[str, ...] = ()  # ONNX Runtime providers for --backend ONNX files (cpu, cuda, tensorrt); () = auto
    allow_cpu_fallback: bool = False  # a requested GPU provider that does not load: run on the CPU instead of failing
    apgd_iterations: int = 20
    restarts: int = 1
    tog_score: float = 0.5
    attack_seed: int = 0
    attack_padding: bool = False  # attack the letterbox padding too (the paper's protocol attacks the whole input)
    sanity_dir: Optional[str] = None
    transfer_from: Optional[str] = None
    sanity_eps: Tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
    sanity_steps: Tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    sanity_queries: int = 100  # --sanity's gradient-free random search: loss evaluations per image

    @property
    def attacks(self) -> Tuple[str, ...]:
        """--attack as attack names ("suite" expanded; fa_train/adversarial/suite.py)."""
        from fa_train.adversarial.suite import parse_attacks

        return parse_attacks(self.attack)

    def _validate_attacks(self):
        try:
            names = self.attacks
        except ValueError as e:
            raise SettingsError(f"--attack {self.attack}: {e}") from None
        _positive_int(self, "apgd_iterations")
        _positive_int(self, "restarts")
        _positive_int(self, "attack_seed", minimum=0)
        if not (0.0 <= self.tog_score <= 1.0):
            raise SettingsError(f"--tog-score {self.tog_score}: must be in [0, 1]")
        if self.sanity_dir:
            if names == ("none",):
                raise SettingsError("--sanity checks attacks: it cannot run with --attack none")
            if self.backends:
                raise SettingsError("--sanity checks checkpoints (--weights), not --backend files")
            check_output_dir(self.sanity_dir, "--sanity")
            self.sanity_eps, self.sanity_steps = tuple(sorted(self.sanity_eps)), tuple(sorted(self.sanity_steps))
            if not self.sanity_eps or not all(0 < e <= 1 for e in self.sanity_eps):
                raise SettingsError(f"--sanity-eps {self.sanity_eps}: values in (0, 1]")
            if not self.sanity_steps or min(self.sanity_steps) < 1:
                raise SettingsError(f"--sanity-steps {self.sanity_steps}: integers >= 1")
            _positive_int(self, "sanity_queries")
        elif self.transfer_from:
            raise SettingsError("--transfer-from is a check of --sanity: give --sanity DIR too")

    @property
    def threats(self) -> Tuple[str, ...]:
        """--threat as threat names (fa_deploy/robustness/threats.py); the transfer threat alone under --attack none."""
        if self.attacks == ("none",):
            return ("transfer",)
        return parse_threats(self.threat or "all")

    def _validate_threats(self):
        if self.threat is not None and not self.backends:
            raise SettingsError(f"--threat {self.threat}: threats are attacks on deployed files; give --backend FILE")
        try:
            self.threats
        except ValueError as e:
            raise SettingsError(f"--threat {self.threat}: {e}") from None
        if self.attacks == ("none",) and self.threat not in (None, "transfer", "all"):
            raise SettingsError(f"--threat {self.threat} needs an attack (not --attack none)")
        if not (self.diff_weight >= 0):
            raise SettingsError(f"--diff-weight {self.diff_weight}: must be >= 0")
        if not (0.0 < self.detect_score <= 1.0):
            raise SettingsError(f"--detect-score {self.detect_score}: must be in (0, 1]")
        if not (0.0 <= self.min_clean_ap <= 1.0):
            raise SettingsError(f"--min-clean-ap {self.min_clean_ap}: an AP50 in [0, 1]")
        if self.max_deploy_misses is not None and not (0.0 <= self.max_deploy_misses <= 1.0):
            raise SettingsError(f"--max-deploy-misses {self.max_deploy_misses}: a fraction in [0, 1]")
        if self.max_drift is not None and not (self.max_drift >= 0):
            raise SettingsError(f"--max-drift {self.max_drift}: must be >= 0")

    def validate(self) -> "BenchSettings":
        if isinstance(self.steps, str):
            try:
                self.steps = tuple(int(v) for v in self.steps.split(",") if v.strip())
            except ValueError:
                raise SettingsError(f"--steps {self.steps}: expected comma-separated integers like 1,3,5,10") from None
        self.weights, self.backends, self.steps = tuple(self.weights), tuple(self.backends), tuple(self.steps)
        self.providers = tuple(self.providers or ())
        for p in self.providers:
            if p not in ("cpu", "cuda", "tensorrt"):
                raise SettingsError(f"--provider {p}: expected cpu, cuda or tensorrt")
        if not self.weights:
            raise SettingsError("--weights: at least one checkpoint is needed")
        if self.backends and len(self.weights) != 1:
            raise SettingsError("--backend compares exported models with ONE source --weights")
        for i, b in enumerate(self.backends):
            if b in self.backends[:i]:
                raise SettingsError(f"--backend {b} is given twice")
        if not (0.0 <= self.eps <= 1.0) or self.eps != self.eps:
            raise SettingsError(f"--eps {self.eps}: must be in [0, 1] (pixel units of images in [0, 1])")
        self._validate_attacks()
        if self.attack != "none" and self.eps == 0:
            raise SettingsError("--eps 0: an attack needs a budget > 0 (or use --attack none)")
        if not self.steps or min(self.steps) < 1:
            raise SettingsError(f"--steps {','.join(map(str, self.steps))}: steps must be >= 1")
        _positive_int(self, "batch_size")
        _positive_int(self, "max_images", optional=True)
        _positive_int(self, "workers", minimum=0)
        _positive_int(self, "num_vis")
        _img_size(self.img_size)
        _data_spec(self.data)
        if not (self.max_drop >= 0):
            raise SettingsError(f"--max-drop {self.max_drop}: must be >= 0")
        self._validate_threats()
        for name in ("json_path", "md_path"):
            if getattr(self, name):
                check_output_file(getattr(self, name), flag_of(name))
        for name in ("cache_dir", "vis_dir", "report_dir"):
            if getattr(self, name):
                check_output_dir(getattr(self, name), flag_of(name))
        return self


@dataclass
class ExportSettings:
    """fa-export: ONNX files and TensorRT engines of one checkpoint, with their parity."""

    weights: str
    onnx: Tuple[str, ...] = ()
    engine: Tuple[str, ...] = ()
    out_dir: Optional[str] = None
    img_size: Optional[int] = None
    batch: Optional[int] = None  # a static batch of N; without it the batch axis is dynamic over `dynamic`
    dynamic: Optional[Tuple[int, int, int]] = None  # MIN:OPT:MAX, DEFAULT_DYNAMIC_BATCH when neither is given
    opset: int = 17
    calib_data: Optional[str] = None
    calib_images: int = 64
    calib_pgd: bool = False
    calib_eps: float = 0.03
    workspace: int = 4096
    timing_cache: Optional[str] = None
    verify_images: int = 8
    no_verify: bool = False
    extra: dict = field(default_factory=dict)

    PRECISIONS = ("fp32", "fp16", "int8")
    DEFAULT_DYNAMIC_BATCH = (1, 8, 32)

    @property
    def precisions(self) -> Tuple[str, ...]:
        return tuple(p for p in self.PRECISIONS if p in set(self.onnx) | set(self.engine))

    @property
    def is_dynamic(self) -> bool:
        return self.batch is None

    @property
    def batch_range(self) -> Tuple[int, int, int]:
        if self.batch is not None:
            return (self.batch, self.batch, self.batch)
        return tuple(self.dynamic) if self.dynamic else self.DEFAULT_DYNAMIC_BATCH

    def validate(self) -> "ExportSettings":
        self.onnx, self.engine = tuple(self.onnx), tuple(self.engine)
        if not self.onnx and not self.engine:
            raise SettingsError("nothing to do: give --onnx and/or --engine")
        for p in (*self.onnx, *self.engine):
            if p not in self.PRECISIONS:
                raise SettingsError(f"precision {p!r}: expected one of {', '.join(self.PRECISIONS)}")
        _positive_int(self, "batch", optional=True)
        if self.batch is not None and self.dynamic is not None:
            raise SettingsError("--batch N (a static batch) and --dynamic-batch MIN:OPT:MAX exclude each other")
        _positive_int(self, "verify_images")
        _positive_int(self, "calib_images")
        _positive_int(self, "workspace")
        _img_size(self.img_size)
        _data_spec(self.calib_data, "--calib-data")
        if self.dynamic is not None:
            lo, opt, hi = self.dynamic
            if not 1 <= lo <= opt <= hi:
                raise SettingsError(f"--dynamic-batch {lo}:{opt}:{hi}: expected MIN:OPT:MAX with "
                                    f"1 <= MIN <= OPT <= MAX")
        if not 7 <= self.opset <= 23:
            raise SettingsError(f"--opset {self.opset}: expected 7..23 (17 by default)")
        if not (0.0 < self.calib_eps <= 1.0):
            raise SettingsError(f"--calib-eps {self.calib_eps}: must be in (0, 1]")
        if self.out_dir:
            check_output_dir(self.out_dir, "--out")
        if self.timing_cache:
            check_output_file(self.timing_cache, "--timing-cache")
        return self


def settings_fields(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(cls))
