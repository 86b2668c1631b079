"""Submit main_finetune.py (ViT / ChannelViT fine-tuning) to Slurm with submitit; see FINETUNE.md.

Takes every flag of main_finetune.py plus the Slurm flags of util/submit.py, e.g.
    python submitit_finetune.py --nodes 2 --ngpus 8 --partition gpu --job_dir /checkpoint/$USER/%j ...
The job requeues itself on preemption or time-out and resumes from the newest checkpoint in --output_dir.
"""

import main_finetune
from util import submit

if __name__ == "__main__":
    args = submit.parse_args(main_finetune.get_args_parser(), "Submit main_finetune.py to Slurm")
    submit.submit("main_finetune", args)
