"""Submit main_pretrain.py (MAE / ChannelMAE pretraining) to Slurm with submitit; see PRETRAIN.md.

Takes every flag of main_pretrain.py plus the Slurm flags of util/submit.py, e.g.
    python submitit_pretrain.py --nodes 2 --ngpus 8 --partition gpu --job_dir /checkpoint/$USER/%j ...
The job requeues itself on preemption or time-out and resumes from the newest checkpoint in --output_dir.
"""

import main_pretrain
from util import submit

if __name__ == "__main__":
    args = submit.parse_args(main_pretrain.get_args_parser(), "Submit main_pretrain.py to Slurm")
    submit.submit("main_pretrain", args)
