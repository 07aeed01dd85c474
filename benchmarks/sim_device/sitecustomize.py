"""Runs at start-up of every Python process with this directory on PYTHONPATH: with
RAYMOE_SIM_DEVICE set, patches ModelRunner when raymoe's runner module is imported
(sim_device.py says what that does)."""

import os
import sys

if os.environ.get("RAYMOE_SIM_DEVICE"):
    import importlib.abc
    import importlib.machinery

    class _PatchRunner(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "raymoe.actors.engine.runner":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                import sim_device

                sim_device.install(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchRunner())
