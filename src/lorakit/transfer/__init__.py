"""Moving adapters between base models: Trans-LoRA (`trans_lora`), with its generators, discriminator and
distillation."""
from .discriminator import Judgement, judge
from .distill import SoftLabelled, distill, kl_to_teacher, teacher_outputs
from .generators import LMGenerator, NGramGenerator
from .trans_lora import TransLoRAConfig, check_pair, trans_lora

__all__ = ["Judgement", "LMGenerator", "NGramGenerator", "SoftLabelled", "TransLoRAConfig", "check_pair", "distill",
           "judge", "kl_to_teacher", "teacher_outputs", "trans_lora"]
