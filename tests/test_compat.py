"""compat.megatron_fixes.wrap_once: installing a wrapper again replaces it; stack adds a layer."""

import types

from megatron_ualm.compat.megatron_fixes import wrap_once


def test_wrappers_are_replaced_unless_stacked():
    calls = []
    owner = types.SimpleNamespace(step=lambda: calls.append("megatron"))

    def layer(tag):
        def make(inner):
            def wrapper():
                calls.append(tag)
                inner()

            return wrapper

        return make

    for run in range(2):  # two runs in one process: each installs its wrappers again
        wrap_once(owner, "step", layer(f"log{run}"))
        wrap_once(owner, "step", layer(f"eval{run}"), stack=True)
        calls.clear()
        owner.step()
        assert calls == [f"eval{run}", f"log{run}", "megatron"]
