"""Roles that produce data: samplers (rewrites) and reward workers (render + score).

Import-light on purpose: `import actors` pulls in neither torch nor Ray; import the module you
need (`actors.reward_worker`, `scoring.scorers`, `actors.scaling`, …).
"""
