"""Command line: `python -m decoupled_diloco.main --config=experiments/X.py[:variant] --workdir=DIR`.

Override any field with `--config.section.field=value`. Re-running with the
same workdir resumes from its latest checkpoint.

The real runtime runs one process per role over a shared mailbox
(runtime/dist/; `launch/local.py` starts them all on one machine):

  --role=syncer --mailbox=URL
  --role=learner --learner=M --mailbox=URL [--distributed ...]

The syncer needs the run secret in `$DILOCO_SECRET`; a learner needs only its
own credential in `$DILOCO_KEY` (runtime/dist/keys.py; the launchers write
both), or the secret on a host trusted with every key.
"""

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from decoupled_diloco import checkpointing, config as config_lib
from decoupled_diloco import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
_ROLE = flags.DEFINE_enum("role", None, ["learner", "syncer"],
                          "Run one process of the real runtime (default: the whole run in"
                          " this process, with the config's runtime).")
_LEARNER = flags.DEFINE_integer("learner", None, "With --role=learner: which learner (0..M-1).")
_MAILBOX = flags.DEFINE_string("mailbox", None, "With --role: the mailbox URL (file:///path,"
                               " gs://bucket/prefix, s3://bucket/prefix, or"
                               " s3://bucket/prefix?endpoint=http://host:port for an"
                               " S3-compatible store).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "A learner spanning several hosts:"
                                 " call jax.distributed.initialize() (on a TPU slice it needs"
                                 " no more flags).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed off"
                                   " TPU: host:port of the learner's process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: processes"
                                      " of this learner.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process.")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX's persistent compilation cache"
                             " (default: $JAX_COMPILATION_CACHE_DIR if set, else"
                             " WORKDIR/jax_cache; '' turns it off). Processes of one"
                             " run on one machine share one, so a restarted one is quickly"
                             " stepping again.")
flags.mark_flags_as_required(["config", "workdir"])


class _OnlyWarningsFromLibraries(py_logging.Filter):
  """Orbax logs every checkpoint phase at INFO; keep our progress lines readable."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "decoupled_diloco" in record.pathname


def _parse_flags(argv):
  """absl's parser; an override of a field the config lacks is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):  # What ml_collections raises for --config.<unknown>.
    base = config_lib.base_config()  # Declares every field; variants add none.
    for arg in argv[1:]:
      if not arg.startswith("--config."):
        continue
      node, where = base, "config"
      for part in arg[len("--config."):].split("=")[0].split("."):
        if not isinstance(node, type(base)) or part not in node:
          sys.exit(f"error: {arg.split('=')[0]}: {where} has no field {part!r}"
                   + (f"; its fields: {', '.join(sorted(node))}." if isinstance(node, type(base))
                      else "."))
        node, where = node[part], part if where == "config" else f"{where}.{part}"
    raise


def run_syncer(config, workdir: str, mailbox) -> dict:
  """`--role=syncer`: leads (or stands by), merges until the learners are done."""
  from decoupled_diloco import metrics, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from decoupled_diloco import tasks  # pylint: disable=g-import-not-at-top
  from decoupled_diloco.runtime.dist.syncer import SyncerService  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(config)
  workdir_lib.check_writable(workdir)
  with workdir_lib.Lock(workdir):
    task = tasks.build(cfg)
    mailbox.put_config(checkpointing.run_record(config, task))  # The syncer creates the run.
    summary = SyncerService(cfg, task, workdir, mailbox).run()
    path = metrics.write_summary(workdir, {**summary, "config": config.to_dict()})
    logging.info("syncer: results in %s", path)
    return summary


def run_learner(config, workdir: str, mailbox, m: int) -> dict:
  """`--role=learner`: learner m trains (or resumes) in `workdir`, the train.py loop."""
  from decoupled_diloco import tasks  # pylint: disable=g-import-not-at-top
  from decoupled_diloco.runtime.dist.learner import LearnerRuntime  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(config)
  # A learner joins a run the syncer created; it never creates one.
  try:
    mailbox.join(checkpointing.run_record(config, tasks.build(cfg)), cfg.dist.startup_s,
                 cfg.diloco.num_fragments)
  except (TimeoutError, ValueError) as e:
    sys.exit(f"error: learner {m}: {e}")
  make = lambda cfg, task, wd: LearnerRuntime(cfg, task, wd, mailbox, m)
  return train.train_and_evaluate(config, workdir, runtime_factory=make, kind="learner")


def _mailbox(cfg):
  """The mailbox of `--role`, with the keys this process holds."""
  from decoupled_diloco.runtime.dist import keys, mailbox  # pylint: disable=g-import-not-at-top
  if not _MAILBOX.value:
    sys.exit("error: --role needs --mailbox=URL (e.g. file:///tmp/run/mailbox).")
  secret, credential = os.environ.get(keys.SECRET_ENV), os.environ.get(keys.KEY_ENV)
  try:
    if _ROLE.value == "learner" and credential:
      keyring = keys.Keyring.from_credential(credential)
      if keyring.learner != _LEARNER.value:
        sys.exit(f"error: ${keys.KEY_ENV} is learner {keyring.learner}'s credential, not"
                 f" --learner={_LEARNER.value}'s.")
    elif secret:
      keyring = keys.Keyring.from_secret(
          secret.encode(), keys.learner(_LEARNER.value) if _ROLE.value == "learner" else keys.SYNCER)
    else:
      sys.exit(f"error: --role={_ROLE.value} needs the run secret in ${keys.SECRET_ENV}"
               + (f" or its learner credential in ${keys.KEY_ENV}" if _ROLE.value == "learner"
                  else "") + " (never on a command line; the launchers set it).")
    return mailbox.Mailbox(_MAILBOX.value, keyring, num_learners=cfg.diloco.num_learners,
                           timeout_s=cfg.dist.store_timeout_s, retry_s=cfg.dist.store_retry_s)
  except (ValueError, mailbox.StoreError) as e:
    sys.exit(f"error: --mailbox={_MAILBOX.value}: {e}")


def _use_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  path = _CACHE.value
  if path is None:  # A sweep's (or the tests') shared cache, else this run's own.
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(_WORKDIR.value, "jax_cache")
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  _use_compilation_cache()
  if _ROLE.value is None:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    return
  if _DISTRIBUTED.value:
    from decoupled_diloco.runtime.dist import multihost  # pylint: disable=g-import-not-at-top
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _ROLE.value == "learner" and _LEARNER.value is None:
    sys.exit("error: --role=learner needs --learner=M.")
  box = _mailbox(config_lib.parse(_CONFIG.value))
  if _ROLE.value == "syncer":
    run_syncer(_CONFIG.value, _WORKDIR.value, box)
  else:
    run_learner(_CONFIG.value, _WORKDIR.value, box, _LEARNER.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
