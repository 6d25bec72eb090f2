#!/usr/bin/env python
"""Save a trained LossFreeMoe as a stock GLM-4.5 (`glm4_moe`) checkpoint, optionally on the Hub.

The folder loads with `AutoModelForCausalLM.from_pretrained(folder)` in plain transformers, without
`trust_remote_code` and without this package, and vLLM and SGLang serve it as they serve GLM-4.5. A configuration
GLM-4.5 cannot express (softmax gate, multiplicative bias, ...) stops the script before anything is written.

    python scripts/export.py --model outputs/lossfree-moe-tiny --output_dir outputs/lossfree-moe-tiny-glm4_moe
    python scripts/export.py --model someone/lossfree-moe --output_dir exported \\
        --push_to_hub --hub_model_id someone/lossfree-moe-glm4_moe
"""

import sys
from dataclasses import dataclass, field

from huggingface_hub import HfApi
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser

from hf_lossfree_moe import export_to_glm4_moe


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "The LossFreeMoe model to export: a saved folder or a Hub id."})
    output_dir: str = field(metadata={"help": "Where to write the glm4_moe checkpoint."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the folder to --hub_model_id afterwards."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository of the export, e.g. your-name/model-glm4_moe."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})


def export(args: ExportArguments) -> None:
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError(
            "--push_to_hub needs --hub_model_id, the repository to create, e.g. your-name/model-glm4_moe."
        )
    folder = export_to_glm4_moe(args.model, args.output_dir, repo_id=args.hub_model_id)
    print(f"Stock glm4_moe checkpoint: {folder}  (AutoModelForCausalLM.from_pretrained, no trust_remote_code)")
    if args.push_to_hub:
        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=args.hub_model_id, folder_path=folder, commit_message="Export to glm4_moe")
        print(f"Pushed to https://huggingface.co/{args.hub_model_id}")


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    try:
        export(args)
    except (ValueError, OSError, StrictDataclassError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
