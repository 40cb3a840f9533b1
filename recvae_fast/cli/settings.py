"""What a command runs with: the data and its split, the hyperparameters of a new or resumed run,
and the scoring settings; each checked before anything is written."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .. import data as data_mod
from ..precision import DEFAULT_PRECISION, PRECISIONS
from ..runfolder import RUN_FORMAT, RUN_NAME, RunFolderError, read_json
from ..training import TrainConfig, check_fit_inputs
from ..validation import DATA_OPTION_RULES, check_run_description
from .errors import UsageError, one_line
from .parser import EVAL_BATCH_SIZE, FLAG_CHOICES, HYPER_FLAGS, SYNTHETIC_EPOCHS, flag_name

# Flags that define the data and its split (saved in run.json, reused by --resume and recommend).
DATA_OPTIONS = tuple(DATA_OPTION_RULES)
LAYOUT_OPTIONS = ("sep", "user_col", "item_col", "rating_col")  # how a file is read: the run's own file only


@dataclass
class RunSettings:
    """A run's data and hyperparameters: source ('synthetic' or a file's absolute path), data (the data
    flags, DATA_OPTIONS), config (TrainConfig's fields) and saved_run (the run.json of the run they
    continue; None: a new run)."""
    source: str
    data: dict
    config: dict
    saved_run: dict | None = None


# ----------------------------------------------------------------------------- data


def data_options(args) -> dict:
    """The data flags given on the command line (None: not given)."""
    return {name: getattr(args, name, None) for name in DATA_OPTIONS}


def data_source(data: str) -> str:
    """'synthetic' or the data file's absolute path (checked to exist)."""
    if data == "synthetic":
        return data
    path = Path(data)
    if not path.is_file():
        raise UsageError(f"data file not found: {data}" if not path.exists() else f"data path is not a file: {data}")
    return str(path.resolve())


def load_data(source: str, options: dict, *, rating_threshold="from options") -> data_mod.Interactions:
    if source == "synthetic":
        return data_mod.synthetic_dataset(seed=options.get("data_seed") or 0)
    threshold = options.get("rating_threshold") if rating_threshold == "from options" else rating_threshold
    return data_mod.load_interactions(
        source, sep=options.get("sep"), user_col=options.get("user_col"), item_col=options.get("item_col"),
        rating_col=options.get("rating_col"), rating_threshold=threshold,
    )


def _make_split(source: str, options: dict, seed: int) -> data_mod.Split:
    interactions = data_mod.preprocess(load_data(source, options), min_items_per_user=options["min_items"],
                                       min_users_per_item=options.get("min_users_per_item") or 0)
    if options["heldout_users"] is None:
        options["heldout_users"] = max(1, interactions.matrix.shape[0] // 10)
    return data_mod.split_strong_generalization(interactions, n_heldout_users=options["heldout_users"], seed=seed)


# ----------------------------------------------------------------------------- a run's settings


def given_hyperparameters(args) -> dict:
    """TrainConfig fields given on the command line."""
    given = {}
    for dest, name in HYPER_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            given[name] = FLAG_CHOICES[dest][value] if dest in FLAG_CHOICES else value
    if "beta" in given and "gamma" not in given:
        given["gamma"] = None  # --beta replaces the default gamma
    return given


def training_options(args) -> dict:
    """run.json's "training": patience and the metric cut-offs of this run (validation.TRAINING_OPTION_RULES)."""
    return {"patience": args.patience, "topk": list(args.topk) if args.topk is not None else None}


def _setting_text(value) -> str:
    """A setting as given on the command line: --topk's cut-offs as 10,100."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def new_run_settings(args) -> RunSettings:
    """A new run's settings: the data and flags given, with the defaults."""
    options = data_options(args)
    options["min_items"] = 5 if options["min_items"] is None else options["min_items"]
    options["min_users_per_item"] = options["min_users_per_item"] or 0
    config = {**asdict(TrainConfig()), **given_hyperparameters(args)}
    if (args.data or "synthetic") == "synthetic" and args.epochs is None:
        config["n_epochs"] = SYNTHETIC_EPOCHS
    return RunSettings(data_source(args.data or "synthetic"), options, config)


def resume_settings(out: Path, args, item_shards: int | None = None) -> RunSettings:
    """The settings of the run in `out`, with the flags given now; refuses flags that differ from the
    run's (only --epochs may change, and with --force --patience and --topk) and another number of
    item shards (None: a single-process run). Sets args.patience and args.topk to the run's unless
    given (a run.json written before they were saved: the flags given now, or their defaults, as
    resume then did)."""
    if not (out / RUN_NAME).is_file():
        raise UsageError(f"--resume: {out} holds no run to continue (no {RUN_NAME})")
    saved = read_json(out / RUN_NAME)
    source, options, config = check_run_description(saved, out / RUN_NAME, RUN_FORMAT, TrainConfig.__dataclass_fields__)
    config.setdefault("precision", DEFAULT_PRECISION)  # a run.json written before the flag existed ran in float32
    try:
        TrainConfig(**config).validate()
    except (TypeError, ValueError) as exc:
        raise RunFolderError(f"{out / RUN_NAME}: config: {one_line(exc)}") from None
    if saved.get("item_shards") != item_shards:
        trained, now = (f"--item-shards {n} under torchrun" if n else "one process, without --item-shards"
                        for n in (saved.get("item_shards"), item_shards))
        raise UsageError(f"--resume: {out} was trained with {trained}, not {now}; resume it the same way")
    differ = []
    if args.data is not None and data_source(args.data) != source:
        differ.append(f"data {args.data} (the run's: {source})")
    for name, value in data_options(args).items():
        if value is not None and value != options.get(name):
            differ.append(f"{flag_name(name)} {value} (the run's: {options.get(name)})")
    given = given_hyperparameters(args)
    for dest, name in HYPER_FLAGS.items():
        if name in given and name != "n_epochs" and given[name] != config.get(name):
            differ.append(f"{flag_name(dest)} {getattr(args, dest)} (the run's: {config.get(name)})")
    training = saved.get("training")  # checked by check_run_description
    if training is not None:
        saved_topk = tuple(training["topk"]) if training["topk"] is not None else None
        for name, saved_value in (("patience", training["patience"]), ("topk", saved_topk)):
            value = getattr(args, name)
            if value is None:
                setattr(args, name, saved_value)
            elif value != saved_value and not args.force:
                differ.append(f"{flag_name(name)} {_setting_text(value)} (the run's: {_setting_text(saved_value)}; "
                              "--force accepts it)")
    if differ:
        raise UsageError("--resume continues a run with its own data and settings; these differ: "
                         + "; ".join(differ) + " (omit them, or train into another --out)")
    config.update(given)
    return RunSettings(source, options, config, saved)


def checked_split(args, out: Path, run: RunSettings, item_shards: int | None = None):
    """(TrainConfig, split, its fingerprint) after checking the hyperparameters, that a resumed run's
    data did not change, and fit's inputs; writes nothing."""
    cfg = TrainConfig(**run.config)
    cfg.validate()
    split = _make_split(run.source, run.data, cfg.seed)
    split_fp = split.fingerprint()
    if run.saved_run is not None and run.saved_run.get("split_fingerprint") != split_fp:
        raise UsageError(f"--resume: the data at {run.source} is no longer what {out} was trained on "
                         "(the file changed since the run started)")
    check_fit_inputs(split.train, split.valid_in, split.valid_out, patience=args.patience, metric_ks=args.topk,
                     eval_batch_size=eval_batch_size(args), item_shards=item_shards or 1, **asdict(cfg))
    return cfg, split, split_fp


# ----------------------------------------------------------------------------- scoring


def eval_batch_size(args) -> int:
    return EVAL_BATCH_SIZE if args.eval_batch_size is None else args.eval_batch_size


def scoring_precision(args, description: dict) -> str:
    """--precision, or the precision the run was trained in (run.json), or float32."""
    if args.precision is not None:
        return args.precision
    config = description.get("config")
    saved = config.get("precision", DEFAULT_PRECISION) if isinstance(config, dict) else DEFAULT_PRECISION
    if saved not in PRECISIONS:
        raise RunFolderError(f"run.json names an unknown precision {saved!r}")
    return saved


def check_output(output: Path, inputs: list[Path]) -> None:
    """An output file that is neither a folder nor one of `inputs`."""
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise UsageError(f"--output {output} would overwrite an input ({path})")
