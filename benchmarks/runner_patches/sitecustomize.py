"""Runs at start-up of every Python process with this directory on PYTHONPATH (Ray's workers
inherit PYTHONPATH and the environment on a local cluster): when raymoe's runner module is
imported, patches its ModelRunner with each patch whose variable is set:

- ``RAYMOE_SIM_DEVICE``: an ideal accelerator for CPU ranks (sim_device.py);
- ``RAYMOE_STEP_TRACE``: a timeline of every step a rank runs (step_trace.py).
"""

import os
import sys

PATCHES = {"RAYMOE_SIM_DEVICE": "sim_device", "RAYMOE_STEP_TRACE": "step_trace"}

if any(os.environ.get(var) for var in PATCHES):
    import importlib
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
                for var, patch in PATCHES.items():
                    if os.environ.get(var):
                        importlib.import_module(patch).install(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchRunner())
