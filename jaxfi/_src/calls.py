"""Call-like primitives: equations whose body is the computation itself.

Maps each such primitive to the param holding its body; interpreters walk
through these bodies (inlining them) rather than treating the call as one op.
"""

from jax.extend import core as jex
from jax.extend.core import primitives as prims

INLINE = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}


def sub_jaxprs(eqn: jex.JaxprEqn) -> list[jex.Jaxpr]:
    """The jaxprs held in an equation's params (call bodies, branches, loop bodies)."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex.Jaxpr):
                found.append(item)
    return found
