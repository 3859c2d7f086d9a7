"""Every knob of dakd-jax with the method's defaults (../shared/docs/method.md, sections in brackets).

Not an experiment by itself: `sysu.py`, `regdb.py` and `demo.py` start from here and change what
differs. Derived values (steps per epoch, schedules, gallery sizes) are computed in code from the
resolved config, never here, so overriding a field never leaves a stale value behind.

`get_config(arg)` takes an optional preset name:
  default       what we believe the paper means (per-sample masking that keeps confident teacher
                predictions, clean strong branch, region CutSwap, two-stream stem);
  released_code every knob set to what the authors' released code does (method.md section 10),
                so numbers can be compared with their checkpoints.
"""
import ml_collections

PRESETS = ("default", "released_code")


def get_config(arg=None):
  """Returns the base ConfigDict; `arg` is a preset name from PRESETS (None = "default")."""
  preset = arg or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} in --config=...:{preset}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  # pretrain | teacher | student | eval | all (in order; pretrain only if enabled) | extract
  config.stage = "all"
  config.seed = 0  # one seed for sampling, initialisation and augmentation keys
  # Seed bands: run the stages once per seed into <workdir>/seed_<s>/ and print per-seed numbers
  # with mean +- std (e.g. '(0,1,2)'); () = one run with `seed`.
  config.seeds = ()
  # Confidence-mask cut, a quantile of the batch's teacher confidences in [0, 1] [4.4].
  config.mask_threshold = 0.5

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "sysu_mm01"  # sysu_mm01 | regdb | llcm
  config.data.root = "data/SYSU-MM01"  # extracted dataset (the TFDS manual_dir)
  config.data.prepared_dir = "data/tfds"  # where prepared ArrayRecord files are written
  config.data.trial = 1  # RegDB trial 1..10 (train and test split); ignored elsewhere
  # RegDB's reported number in one command: the stages once per listed trial into
  # <workdir>/trial_<t>/, then each setting per trial with mean +- std (<workdir>/trials.json,
  # trials.md); () = the one trial `data.trial`. configs/regdb.py:trials=all lists 1..10.
  config.data.trials = ()
  config.data.image_height = 384  # pixels; SYSU-MM01 384, RegDB 288 [5.2]
  config.data.image_width = 128  # pixels; SYSU-MM01 128, RegDB 144
  config.data.ids_per_batch = 8  # P: identities per batch [5.1]
  config.data.images_per_id = 4  # K: images per identity per modality (SYSU 4, RegDB 5)
  # Grain worker processes for loading: 0 = in the main process; -1 = from the host's CPU count
  # (0 below 8 CPUs, where in-process loading is faster; printed at start-up)
  config.data.num_workers = -1
  # checkpoint.select=val on a dataset without a shipped validation split (RegDB, LLCM): the
  # share of training identities held out (seeded by `seed`); SYSU-MM01 holds out exp/val_id.txt
  config.data.val_fraction = 0.1

  # A generated cross-modal dataset written at data.root in the real layout (tests, demo).
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.enabled = False  # generate data.root if missing (refuses non-synthetic dirs)
  config.synthetic.num_train_ids = 32  # identities in exp/train_id.txt
  config.synthetic.num_val_ids = 8  # identities in exp/val_id.txt (trained on, as on SYSU)
  config.synthetic.num_test_ids = 24  # identities in exp/test_id.txt
  config.synthetic.images_per_camera = 10  # per identity and camera folder
  config.synthetic.image_height = 128  # pixels of the generated files
  config.synthetic.image_width = 64
  config.synthetic.seed = 0

  # Stand-in for ImageNet weights where none exist (the CPU demo): a short identity-classifier
  # training on a separate synthetic dataset (other persons), whose weights then initialise the
  # teacher and the student. Off for real experiments: they start from model.init_weights.
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.enabled = False  # stage=all runs pretrain first; teacher/student start from it
  config.pretrain.data_root = "data/synthetic_pretrain"  # generated there (never data.root)
  config.pretrain.num_ids = 96  # training identities of the pretraining set
  config.pretrain.num_test_ids = 12  # held out, for its own final evaluation
  config.pretrain.images_per_camera = 6
  config.pretrain.seed = 1  # must differ from synthetic.seed (other persons)
  config.pretrain.epochs = 15
  config.pretrain.steps_per_epoch = 20
  config.pretrain.lr = 1e-3  # Adam, constant

  config.model = ml_collections.ConfigDict()
  config.model.depth = 50  # ResNet depth: 10 | 18 | 34 | 50 [2.1]
  config.model.width = 64  # base channel width (64 = standard ResNet; smaller for CPU demos)
  config.model.modality_specific_stem = preset != "released_code"  # two-stream stem [2.1]
  config.model.non_local = True  # AGW non-local blocks in layer2 and layer3 [2.1]
  config.model.gem_p = 3.0  # initial GeM exponent (learnable) [2.1]
  config.model.compute_dtype = "float32"  # float32 | bfloat16 (params and BN stats stay float32)
  config.model.init_weights = ""  # torchvision ResNet file (.safetensors/.npz/.pth); "" = random
  # Parts recomputed in the backward pass instead of stored (same values and gradients):
  # () | ("stem",) | ("non_local",) | ("stem", "non_local"). Off: both parts remove 16% of the
  # activations JAX keeps for the backward pass, but XLA:CPU folds the recomputation back (same
  # compiled convolutions), so the teacher step's temporaries stay 1.58 GiB (ResNet-50, 24
  # images of 192x96: benchmarks/step_memory.py); measure on an accelerator with
  # benchmarks/gpu_report.py --remat stem,non_local before turning it on.
  config.model.remat = ()
  # Convolution gradients: auto | custom | xla. auto: on CPU the 1x1 convolutions' gradients
  # are matrix products (dakd_jax/models/conv.py; ResNet-50 teacher step 19.1 -> 11.1 s on one
  # CPU thread), the stem max-pool's a routing of the output gradient (models/pool.py), the
  # batch norms' written by hand (models/batch_norm.py) and each stem run on its own images
  # only in the training steps; elsewhere autodiff's (cuDNN and the TPU compiler run those
  # well). Same gradients to rounding; configs/demo.py keeps xla (README Results, issue 25).
  config.model.conv_backward = "auto"

  config.augment = ml_collections.ConfigDict()
  # CutSwap on visible views where the dataset's recipe has it (SYSU-MM01, LLCM; never RegDB)
  config.augment.use_cutswap = True
  config.augment.cutswap_mode = "whole_image" if preset == "released_code" else "region"  # [5.2]
  config.augment.cutswap_prob = 0.5  # probability of CutSwap on a visible image
  config.augment.cutswap_min = 0.3  # region height/width fraction drawn in [min, max)
  config.augment.cutswap_max = 0.6
  config.augment.erasing_prob = 0.5  # random erasing probability on every view
  config.augment.flip_prob = 0.5  # horizontal flip probability
  config.augment.pad = 10  # pixels of padding before the random crop

  config.optim = ml_collections.ConfigDict()
  config.optim.b1 = 0.9  # Adam betas and epsilon, both stages [3.4, 4.7]
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8

  config.teacher = ml_collections.ConfigDict()
  config.teacher.epochs = 160  # [3.4]
  config.teacher.steps_per_epoch = 0  # 0 = the sampler's epoch length (SYSU 696, RegDB 52)
  config.teacher.lr = 3.5e-4  # base learning rate
  config.teacher.weight_decay = 5e-4  # coupled L2 added to the gradient (not AdamW)
  config.teacher.warmup_epochs = 10  # linear warm-up lr * (e+1)/warmup
  config.teacher.decay_epochs = (20, 40)  # (D1, D2): x0.1 after D1, x0.01 from D2 (RegDB 30, 60)
  config.teacher.memory_temperature = 0.05  # tau of the memory logits [3.2]
  config.teacher.hard_momentum = 0.1  # global memory update momentum (hardest row)
  config.teacher.mean_momentum = 0.25  # view memory update momentum (mean row)
  config.teacher.weight_global = 1.0  # L_g
  config.teacher.weight_view = 1.0  # w_sid on L_v + L_i
  config.teacher.weight_channel = 0.4  # w_sid * w_caid on L_a
  config.teacher.weight_kl = 1.2  # modality alignment KL
  config.teacher.weight_triplet = 1.0  # global-centre triplet
  config.teacher.triplet_margin = 0.3
  config.teacher.cutswap = True  # CutSwap on the teacher's visible view (MCE original: False)
  config.teacher.eval_every_epochs = 2  # evaluate every N epochs ...
  config.teacher.eval_start_epoch = 10  # ... after this epoch (and always after the last)

  config.distill = ml_collections.ConfigDict()
  config.distill.epochs = 160  # [4.7]
  config.distill.steps_per_epoch = 0  # 0 = the sampler's epoch length
  config.distill.lr = 3.5e-4  # constant, no weight decay
  config.distill.teacher_checkpoint = ""  # teacher workdir or checkpoint dir; "" = <workdir>/teacher
  config.distill.temperatures = (4.0, 3.0, 5.0, 2.0, 6.0)  # multi-temperature set, base first [4.3]
  config.distill.kd_weight = 0.9  # multiplies every KD term
  config.distill.instance_weight = 0.5  # L_inst weight inside the sums [4.5]
  config.distill.class_weight = 0.5  # L_cls weight
  config.distill.plain_kd_weight = 1.0  # L_kd weight (only_kd ablation)
  config.distill.centre_temperature = 0.05  # class logits = s C^T / this
  config.distill.logit_standardize = True  # z-score every logit row before KD
  # Which side of the confidence cut is kept: high = paper wording, low = released code [4.4].
  config.distill.mask_keep = "low" if preset == "released_code" else "high"
  # How the mask is applied: select = per-sample (MLKD design), scale = released arithmetic.
  config.distill.mask_mode = "scale" if preset == "released_code" else "select"
  # Released code computes the T=2,6 "strong" terms on the infrared branch [4.5].
  config.distill.strong_uses_weak_at_2_6 = preset == "released_code"
  config.distill.ablation = "full_mlkd"  # only_kd | mlkd_no_instance | mlkd_no_class | full_mlkd
  # Released quirk [4.7]: BN running averages updated twice per step (computed in closed form,
  # no extra forward pass).
  config.distill.double_bn_update = preset == "released_code"
  # Per-modality BN statistics of the student [4.1]: "grouped" = one call on [visible; infrared]
  # with two BN groups, "two_calls" = the released two calls; same values, gradients and running
  # averages. two_calls by default: on 2 CPU cores grouped is slower (ResNet-50, 8 pairs of
  # 192x96: 2.14 s against 1.86 s per student step, CPU time 1.10x; benchmarks/train_step.py
  # --compare); benchmarks/gpu_report.py times both on an accelerator, where one call on twice
  # the batch may win.
  config.distill.student_forward = "two_calls"
  config.distill.eval_every_epochs = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.modes = ("all", "indoor")  # SYSU-MM01 search modes [7.2]
  config.eval.shots = ("single", "multi")  # SYSU-MM01 gallery shots
  config.eval.num_trials = 10  # gallery trials, seeds 0..N-1 (SYSU-MM01, LLCM)
  config.eval.training_modes = ("all",)  # SYSU-MM01 modes evaluated during training (single-shot)
  # Query directions, () = all of the dataset's: RegDB visible_to_thermal, thermal_to_visible
  # [7.3]; LLCM infrared_to_visible, visible_to_infrared (llcm.md 3.2)
  config.eval.directions = ()
  # LLCM visible->infrared: plain (all visible queries vs sampled infrared gallery) or
  # deen_test_script (what the DEEN/AGW test scripts compute; llcm.md 3.2, 6.1)
  config.eval.llcm_vis_to_ir = "plain"
  config.eval.rerank = False  # k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) [7.1]
  config.eval.flip = False  # average the embeddings of the image and its mirror
  config.eval.batch_size = 64  # images per extraction batch (divisible by the device count)
  config.eval.max_rank = 20  # CMC length
  # Average query expansion (fast-reid's AQE: each query plus its top-k gallery neighbours
  # weighted by similarity^alpha); off for comparisons with the paper.
  config.eval.query_expansion = False
  config.eval.aqe_k = 5  # neighbours per query
  config.eval.aqe_alpha = 3.0  # weight exponent
  # Verification: TPR at these false-positive rates over all query-gallery pairs; () skips it.
  config.eval.tpr_fprs = (1e-4, 1e-3, 1e-2)
  # Evaluating a RegDB model on another trial than it was trained on mixes its training
  # identities into the test set; refused unless this is set.
  config.eval.allow_trial_mismatch = False
  # stage=eval: a checkpoint dir, or a variables .npz (pretrain/backbone.npz); "" = student best
  config.eval.checkpoint = ""
  config.eval.features = ""  # stage=eval: a .npz of saved features instead of a checkpoint
  config.eval.pictures = True  # stage=eval: CMC/training-curve/ranked-result PNGs and report.md
  config.eval.num_visual_queries = 8  # queries (rows) per ranked-result picture, drawn by seed
  config.eval.visual_top_k = 10  # gallery images shown per query
  # stage=eval: analysis pictures (2-D map of the embeddings, distance histograms, ROC,
  # activation maps of queries and their top matches).
  config.eval.analysis = False
  config.eval.analysis_method = "pca"  # pca | tsne (t-SNE needs the `analysis` extra)
  config.eval.analysis_identities = 20  # identities drawn in the 2-D map
  # stage=eval: corrupt the visible test images before extraction (SYSU-MM01-C / RegDB-C;
  # README "Robustness"; needs the `robustness` extra): none | a corruption name (gaussian_noise,
  # ..., rain) | mixed (one of the 20 drawn per image, the benchmark's figure) | all (every
  # corruption in turn, then mixed). Results go to eval/corrupted-<name>-s<severity>/ or
  # eval/robustness/, never over eval/results.json. Corrupted images are a function of `seed`.
  config.eval.corruption = "none"
  config.eval.severity = "all"  # "1".."5" | "all" (each in turn; with mixed: drawn per image)

  # stage=extract: embed folders of new images with a checkpoint (eval.checkpoint or student).
  config.extract = ml_collections.ConfigDict()
  config.extract.query_dir = ""  # folder of query images (required for stage=extract)
  config.extract.gallery_dir = ""  # folder of gallery images; "" = embed the queries only
  config.extract.query_modality = "infrared"  # visible | infrared (stem routing)
  config.extract.gallery_modality = "visible"  # visible | infrared

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000  # save every N steps (and at each evaluation)
  config.checkpoint.keep_last = 2  # newest N kept ...
  config.checkpoint.keep_best = 1  # ... plus the best N by the selection's mAP
  # Which checkpoint a stage hands on (to the student, stage=eval, export) and reports:
  # last (the final step; no evaluation during training), val (best mAP on held-out training
  # identities; they are not trained on) or test_oracle (best test-split mAP, as the authors'
  # code does: labelled "oracle (test-set selection)" wherever it is reported).
  config.checkpoint.select = "test_oracle" if preset == "released_code" else "last"
  config.checkpoint.resume = ""  # explicit checkpoint to resume from if the workdir has none
  config.checkpoint.allow_config_change = False  # resume even if the config differs

  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 50  # metrics to TensorBoard/JSONL and the progress line
  config.log.progress = True  # show a progress line
  return config
