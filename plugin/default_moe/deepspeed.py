"""`import default_moe.deepspeed` makes `deepspeed.initialize` honour the "default_moe" section.

See `default_moe.integrations.deepspeed` for the details.
"""

from default_moe.integrations.deepspeed import (  # noqa: F401
    DeepSpeedMoESection,
    initialize,
    register,
    skip_cpu_jit_builds,
    unregister,
)

register()
