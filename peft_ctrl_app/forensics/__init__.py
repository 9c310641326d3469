"""SEAL forensics: simulated attacks on released adapters (``attacks``) and the ``peft-ctrl seal`` commands
(``cli``). The watermark itself and its verifier are library code: ``peft_ctrl.seal``."""
