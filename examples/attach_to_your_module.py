"""The few lines to add to an existing Lightning RL setup.

Your LightningModule holds a Hugging Face causal LM (full or peft LoRA) and does its own
rollouts and policy-gradient loss. Add the callback; nothing else changes, and the training run
is not altered (the probe never touches the RNG, parameters, gradients or optimizer state).

    .venv/bin/python examples/attach_to_your_module.py
"""

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from entropy_callbacks import EntropyProbe, SamplingConfig
from entropy_callbacks.toy import GRPOModule  # stands in for your own module

module = GRPOModule()  # has .policy (the HF model) and .tokenizer

probe = EntropyProbe(
    prompts=["2 3 =", "0 8 =", "1 1 =", "0 7 =", "4 8 =", "1 3 =", "0 1 =", "9 1 ="],  # held out
    sampling=SamplingConfig(max_new_tokens=3, temperature=1.0),  # your rollout sampling
    every_n_steps=10,
    responses_per_prompt=8,
    order=2,
    policy="policy",        # attribute path of the HF model (autodetected when there is one)
    tokenizer="tokenizer",  # needed for string prompts
)

trainer = pl.Trainer(max_steps=30, accelerator="cpu", callbacks=[probe],
                     logger=TensorBoardLogger("runs/example", name=""), enable_checkpointing=False)
trainer.fit(module)
print(f"tensorboard --logdir {trainer.log_dir}")

# In a LightningCLI YAML the same thing is a trainer.callbacks entry:
#
# trainer:
#   callbacks:
#     - class_path: entropy_callbacks.EntropyProbe
#       init_args:
#         prompts: heldout.txt
#         sampling: {max_new_tokens: 256, temperature: 1.0}
#         every_n_steps: 10
#         tokenizer: tokenizer
