"""The learner's maths and model pieces: objectives, schedules, flow head, policy passes, plasticity.

Import-light on purpose (no Ray, no Redis): `import learner.losses` needs only torch, so the
objectives are testable on their own and usable from any role.
"""
