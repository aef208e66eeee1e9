"""What the parent (orchestrator/) and the worker (worker/) agree on, in one torch-free package both import.

    messages    the JSON lines between them, and the control lines back
    spec        the worker spec: the typed recipe, its resolved chain, the device (validated by the worker)
    recipe      the recipe settings schema and what its "auto" values mean
    boxes       box formats (a model's text -> a box in pixels) and IoU
    dataset     the grounding set's one reader: picks the format, subsets, checks ground truth against the image
    readers     JSON lines and COCO JSON          columnar  parquet and save_to_disk arrow files (pyarrow)
    samples     one sample, its box in xyxy       images    where an image is, read upright (EXIF), its size
    checkpoint  checkpoint files: configs, safetensors headers, weight files, fingerprints
    layout      the run folder: every file name, once
    run_row     what a run records of its results: each recipe's row, its Status, the IoU rule, the run's summary
    nvml        what the NVIDIA driver says about GPU memory (the parent decides with it, the worker measures)
    exits       exit codes
    units       bytes for people

Rules (tests/test_architecture.py): this package imports neither orchestrator nor worker, nor torch,
transformers or peft; the worker imports nothing from orchestrator.
"""
