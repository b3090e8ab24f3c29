"""Pairing student and teacher features level by level, with one-line errors that name the tensors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def pair_levels(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    num_levels: int | None = None,
) -> list[tuple[str, str, Tensor, Tensor]]:
    """``(student name, teacher name, student, teacher)`` per level.

    A pair of tensors is one level; a pair of sequences is one tensor per level. ``num_levels`` (if given) is the
    number of levels the loss was built for.
    """
    s_is_t = isinstance(student_feats, Tensor)
    t_is_t = isinstance(teacher_feats, Tensor)
    if s_is_t and t_is_t:
        if num_levels is not None and num_levels != 1:
            raise ValueError(
                f"got single tensors but the loss was built for {num_levels} levels; pass sequences of "
                f"{num_levels} tensors"
            )
        return [("student_feats", "teacher_feats", student_feats, teacher_feats)]
    if s_is_t != t_is_t:
        raise ValueError(
            "student_feats and teacher_feats must both be tensors or both be sequences of tensors, got "
            f"{type(student_feats).__name__} and {type(teacher_feats).__name__}"
        )
    if not isinstance(student_feats, Sequence) or not isinstance(teacher_feats, Sequence):
        raise ValueError(
            "student_feats and teacher_feats must be tensors or sequences of tensors, got "
            f"{type(student_feats).__name__} and {type(teacher_feats).__name__}"
        )
    if num_levels is None:
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"student_feats has {len(student_feats)} levels but teacher_feats has {len(teacher_feats)}"
            )
    else:
        for name, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
            if len(feats) != num_levels:
                raise ValueError(f"{name} has {len(feats)} levels, the loss was built for {num_levels}")
    if len(student_feats) == 0:
        raise ValueError("student_feats and teacher_feats are empty; need at least one level")
    pairs = []
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if not isinstance(s, Tensor) or not isinstance(t, Tensor):
            raise ValueError(
                f"student_feats[{i}] and teacher_feats[{i}] must be tensors, got {type(s).__name__} and "
                f"{type(t).__name__}"
            )
        pairs.append((f"student_feats[{i}]", f"teacher_feats[{i}]", s, t))
    return pairs
