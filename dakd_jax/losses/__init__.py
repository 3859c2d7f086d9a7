"""Losses of both stages and the teacher's class-centre memories (method.md sections 3 and 4).

`memory`: centre memories and their updates; `alignment`: teacher-stage losses; `distill`: the
DAKD student loss. All are pure functions of arrays, called inside the jitted train steps.
"""
from dakd_jax.losses.alignment import (TeacherSettings, centre_triplet, memory_cross_entropy,
                                       modality_kl, teacher_loss)
from dakd_jax.losses.distill import (ABLATIONS, PAPER_DISTILL, RELEASED_DISTILL,
                                     DistillSettings, confidence_mask, dakd_loss,
                                     kd_divergence, standardize_logits)
from dakd_jax.losses.memory import (CentreMemories, build_centres, init_memories, unit_rows,
                                    update_memories)

__all__ = [
    "ABLATIONS", "PAPER_DISTILL", "RELEASED_DISTILL", "CentreMemories", "DistillSettings",
    "TeacherSettings", "build_centres", "centre_triplet", "confidence_mask", "dakd_loss",
    "init_memories", "kd_divergence", "memory_cross_entropy", "modality_kl",
    "standardize_logits", "teacher_loss", "unit_rows", "update_memories",
]
