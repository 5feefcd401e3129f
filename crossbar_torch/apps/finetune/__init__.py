"""Stuck-bit-aware fine-tuning (issue 6; DESIGN.md rules 4, 7 and 9).

In ``train()`` mode the crossbar layers compute with the weights the crossbars would hold if the
*current* latent weight were programmed now: quantized with the fixed scales, gathered through the
fixed sort index (rule 4: no re-sorting), encoded, stuck cells keeping their held level (rule 7),
decoded and un-sorted (rule 9). The gradient passes straight through to the latent float weight.
After training, :func:`crossbar_torch.reprogram` programs the fine-tuned latent weights (stuck cells
keep their levels) and gives the new write counts.

This package is the library part, one job a module:

* ``losses``: :func:`cross_entropy`, :func:`distillation_loss` (KL on temperature-softened
  logits, optionally mixed with cross-entropy), :func:`embedding_loss` (sentence models);
* ``args``: :class:`FinetuneArgs` (hyper-parameters), :class:`FinetuneResult`, the schedule
  (:func:`cosine_lambda`) and the resume check (:func:`check_resume`);
* ``seeding``: :func:`set_seed` and the RNG states a checkpoint saves;
* ``checkpoint``: atomic save / load, the resume state, the crossbar fingerprint, pruning,
  the stuck-cell checks (:func:`stuck_snapshot`, :func:`check_stuck_cells`);
* ``data``: :class:`ResumableSampler`, :class:`SeededDataset`, :func:`collate_train`;
* ``sentences``: distillation of sentence models (:class:`SentenceDataset`,
  :class:`SentenceEmbedder`, :func:`finetune_sentences`);
* ``trainer``: :class:`Trainer` (optimizer, cosine schedule with warmup, deterministic seeding,
  optional AMP on CUDA, DDP when ``torch.distributed`` is initialized, tqdm progress bars,
  atomic checkpoints, exact resume);
* ``api``: :func:`finetune`, :func:`save_final` / :func:`load_finetuned` (the final checkpoint
  format ``{"model", "crossbar_config", "model_name"}``).

:func:`evaluate` (top-1 / top-5 of one model) is
:func:`crossbar_torch.apps.evaluate.evaluate_model`: the applications have one evaluator.

Training checkpoints (``checkpoint-<step>.pt``) hold only what a resume needs: the latent
weights and the other parameters / buffers of the model, the optimizer, scheduler and scaler
states, the RNG states, the step, the losses, the CrossbarConfig and the arguments. The
crossbar buffers that conversion derives from the *original* weights (``cells``, ``stuck``,
``sort_index``: about 10x the float weights) are left out: training never changes them, and a
resume rebuilds them by converting the same float model again (a fingerprint of them, stored
in the checkpoint, checks that the rebuilt ones are the same). ``keep`` keeps only the last N.

A resume refuses a checkpoint made with other arguments (naming each changed one), another
CrossbarConfig (naming the fields), another training set size or process count, or more steps
than the run asks for, and logs the step it resumed from.

Determinism and exact resume
----------------------------
* Sample order: :class:`ResumableSampler` (a ``DistributedSampler`` that can start mid-epoch);
  the order of epoch ``e`` is a pure function of ``(seed, e)``.
* Augmentation: :class:`SeededDataset` seeds ``random``, ``numpy`` and ``torch`` from
  ``(seed, epoch, sample position)`` around each sample's transform, so the augmentation of a
  sample does not depend on the number of DataLoader workers nor on where a run was resumed.
* Everything else random in a step (dropout) uses the global torch RNG of the training process;
  its state (and numpy's and python's) is saved in every checkpoint and restored on resume.
* Read noise (rule 19): each crossbar layer draws it from a counter of its forwards; the
  counters are saved in every checkpoint and restored on resume.
A run stopped after ``k`` steps and resumed from its step-``k`` checkpoint therefore ends with
weights bit-identical to an uninterrupted run (same seed, CPU; tested).
"""
from ..evaluate import evaluate_model as evaluate
from .api import finetune, load_finetuned, save_final, write_final
from .args import (RESUME_FREE, FinetuneArgs, FinetuneResult, ResumeError, TrainingDiverged,
                   check_resume, cosine_lambda, run_length)
from .checkpoint import (CHECKPOINT_FORMAT, DERIVED_BUFFERS, atomic_torch_save,
                         check_stuck_cells, crossbar_fingerprint, load_checkpoint,
                         resume_state_dict, stuck_snapshot)
from .data import ResumableSampler, SeededDataset, collate_train
from .losses import EMBEDDING_LOSSES, LOSSES, cross_entropy, distillation_loss, embedding_loss
from .seeding import set_seed
from .trainer import Trainer, freeze_batchnorm

__all__ = [
    "cross_entropy", "distillation_loss", "embedding_loss", "FinetuneArgs", "FinetuneResult",
    "Trainer", "finetune", "evaluate", "set_seed", "freeze_batchnorm", "stuck_snapshot",
    "check_stuck_cells", "atomic_torch_save", "save_final", "write_final", "load_finetuned",
    "load_checkpoint", "ResumableSampler", "SeededDataset", "cosine_lambda", "ResumeError",
    "TrainingDiverged", "crossbar_fingerprint", "resume_state_dict", "check_resume",
    "run_length", "collate_train", "LOSSES", "EMBEDDING_LOSSES", "RESUME_FREE",
    "CHECKPOINT_FORMAT", "DERIVED_BUFFERS",
]
