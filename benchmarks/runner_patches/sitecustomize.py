"""Runs at start-up of every Python process with this directory on PYTHONPATH (Ray's workers
inherit PYTHONPATH and the environment on a local cluster): when a raymoe module below is
imported, patches it with each patch whose variable is set:

- ``RAYMOE_SIM_DEVICE``: an ideal accelerator for CPU ranks (sim_device.py);
- ``RAYMOE_STEP_TRACE``: a timeline of every step a rank runs (step_trace.py);
- ``RAYMOE_REQUEST_TRACE``: each request's way through the ingress and the controller
  (request_trace.py).
"""

import os
import sys

# variable -> (module patched, patch module, its function that patches)
PATCHES = {
    "RAYMOE_SIM_DEVICE": [("raymoe.actors.engine.runner", "sim_device", "install")],
    "RAYMOE_STEP_TRACE": [("raymoe.actors.engine.runner", "step_trace", "install")],
    "RAYMOE_REQUEST_TRACE": [
        ("raymoe.deploy.openai_server", "request_trace", "install_openai_server"),
        ("raymoe.deploy.engine_client", "request_trace", "install_engine_client"),
        ("raymoe.actors.engine.async_engine", "request_trace", "install_async_engine"),
    ],
}
TARGETS = {target for var, patches in PATCHES.items() if os.environ.get(var) for target, _, _ in patches}

if TARGETS:
    import importlib
    import importlib.abc
    import importlib.machinery

    class _PatchModules(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in TARGETS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                for var, patches in PATCHES.items():
                    for target, patch, function in patches:
                        if os.environ.get(var) and target == name:
                            getattr(importlib.import_module(patch), function)(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchModules())
