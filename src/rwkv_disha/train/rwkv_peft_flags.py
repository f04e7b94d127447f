"""RWKV-PEFT / RWKV-LM train.py flags that `rwkv-disha train` does not take, each with what to do instead.

A script brought from RWKV-PEFT that passes one of these gets that line (``--fla is RWKV-PEFT's older
switch for the fla kernel: use --op fla``) instead of argparse's bare "unrecognized arguments". The names
are RWKV-PEFT's ``rwkvt/args_type.py`` and its README's older spellings; docs/MIGRATING.md lists them.
"""

from __future__ import annotations

_SHAPE = "an RWKV-LM model-shape option: the shape is read from --load_model; drop it"
_PRETRAIN = (
    "an RWKV-LM pretraining option (pile stages, magic_prime sampling); fine-tuning samples with --dataload: "
    "drop it"
)
_OLD_LORA = 'RWKV-PEFT\'s older LoRA flags: use --peft lora --lora_config \'{"lora_r":8,"lora_alpha":32}\''

# flag (without --) -> what to do instead
UNSUPPORTED: dict[str, str] = {
    "fla": "RWKV-PEFT's older switch for the fla kernel: use --op fla",
    "fla_npu": "Ascend NPUs are not supported: use --op fla on a CUDA GPU, or --op torch",
    "state_tune": "RWKV-PEFT's older switch for state tuning: use --peft state",
    "rwkv_version": "use --my_testing (or drop it: the version is read from --load_model)",
    "head_size_a": "use --head_size (or drop it: the head size is read from --load_model)",
    "lora_r": _OLD_LORA,
    "lora_alpha": _OLD_LORA,
    "lora_dropout": "RWKV-PEFT's older LoRA flags: use --lora_config '{\"lora_dropout\":0.01}'",
    "lora_load": 'RWKV-PEFT\'s older LoRA flags: use --lora_config \'{"lora_load":"rwkv-0.pth"}\'',
    "lora_parts": "use --train_parts (e.g. --train_parts time ln)",
    "dropout": "rwkv-disha's models have no dropout (RWKV fine-tuning runs without it): drop it",
    "weight_decay_final": "the weight decay stays at --weight_decay for the whole run: drop it",
    "layerwise_lr": "adapters train at --lr_init / --lr_final (states at --state_lr_scale times it): drop it",
    "optim": "rwkv-disha trains with AdamW (--beta1 --beta2 --adam_eps --weight_decay): drop it",
    "avg_loss": "the loss is the mean over the tokens that count (--loss_mask): drop it",
    "ds_bucket_mb": "DeepSpeed runs with Lightning's bucket sizes: drop it",
    "my_qa_mask": "use --loss_mask qa (the answer masks `rwkv-disha prepare` writes for chat / Q&A data)",
    "mask_id": "--loss_mask se is not supported: use --loss_mask qa with chat / Q&A data from prepare",
    "load_partial": "a base model loads whole, every tensor checked: drop it",
    "l2warp_sparse": "not supported: drop it",
    **dict.fromkeys(
        (
            "dim_att",
            "dim_ffn",
            "pre_ffn",
            "head_qk",
            "tiny_att_dim",
            "tiny_att_layer",
            "my_pos_emb",
            "head_size_divisor",
            "my_ffn_shift",
            "my_att_shift",
        ),
        _SHAPE,
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "my_pile_version",
            "my_pile_stage",
            "my_pile_shift",
            "my_pile_edecay",
            "magic_prime",
            "my_random_steps",
            "my_exit",
            "my_exit_tokens",
            "my_sample_len",
        ),
        _PRETRAIN,
    ),  # fmt: skip
}

# (flag, value) that RWKV-PEFT took and we spell otherwise -> what to do instead
VALUES: dict[tuple[str, str], str] = {
    (
        "train_type",
        "state",
    ): "RWKV-PEFT's older spelling of state tuning: use --peft state (--train_type none)",
    ("quant", "4bit"): "RWKV-PEFT's 4bit is bitsandbytes' fp4: use --quant fp4",
    ("loss_mask", "se"): "not supported: use --loss_mask qa with chat / Q&A data from `rwkv-disha prepare`",
}
