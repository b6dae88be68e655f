# Teachers: one per (dataset, teacher id, teacher seed), shared by every pair that names it.


rule train_teacher:
    input:
        data=lambda w: f"{OUT}/data/{w.dataset}.ready",
    output:
        best=f"{OUT}/teachers/{{dataset}}/{{teacher}}/s{{tseed}}/best.pt",
        last=f"{OUT}/teachers/{{dataset}}/{{teacher}}/s{{tseed}}/last.pt",
        result=f"{OUT}/teachers/{{dataset}}/{{teacher}}/s{{tseed}}/result.json",
    log:
        f"{OUT}/logs/train_teacher/{{dataset}}/{{teacher}}/s{{tseed}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_teacher/{{dataset}}/{{teacher}}/s{{tseed}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: resources_for("train")["threads"]
    resources:
        gpu=resources_for("train")["gpu"],
        gpu_pool=LOCAL_GPUS,
        gpu_slots=LOCAL_GPU_SLOTS,
        mem_mb=resources_for("train")["mem_mb"],
        runtime=resources_for("train")["runtime"],
    params:
        job=decides(job_of_train_teacher),
        run=run_only(job_of_train_teacher),
        run_dir=lambda w, output: os.path.dirname(output.best),
        parent=PARENT_RUN_FILE,
    shell:
        "DFAKD_GPU_POOL={resources.gpu_pool} DFAKD_GPU_SLOTS={resources.gpu_slots} DFAKD_JOB_GPUS={resources.gpu} dfakd train --config-json {params.job:q} --config-json {params.run:q} --parent-run-file {params.parent:q} -o {params.run_dir:q} > {log:q} 2>&1"


rule import_teacher:
    input:
        checkpoint=lambda w: teacher_def(w.teacher)["checkpoint"],
    output:
        best=f"{OUT}/teachers/{{dataset}}/{{teacher}}/imported/best.pt",
    log:
        f"{OUT}/logs/import_teacher/{{dataset}}/{{teacher}}.log",
    benchmark:
        f"{OUT}/benchmarks/import_teacher/{{dataset}}/{{teacher}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        arch=lambda w: teacher_def(w.teacher)["arch"],
        num_classes=lambda w: dataset_classes(w.dataset),
        sha256=lambda w: option("--sha256", teacher_def(w.teacher).get("sha256")),
    shell:
        "dfakd import-teacher {input.checkpoint:q} --arch {params.arch:q} --num-classes {params.num_classes} "
        "{params.sha256:q} --out {output.best:q} > {log:q} 2>&1"


rule evaluate_teacher:
    input:
        data=lambda w: f"{OUT}/data/{w.dataset}.ready",
        checkpoint=f"{OUT}/teachers/{{dataset}}/{{teacher}}/{{run}}/best.pt",
    output:
        f"{OUT}/teachers/{{dataset}}/{{teacher}}/{{run}}/eval.json",
    log:
        f"{OUT}/logs/evaluate_teacher/{{dataset}}/{{teacher}}/{{run}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_teacher/{{dataset}}/{{teacher}}/{{run}}.tsv"
    wildcard_constraints:
        run=r"imported|s[0-9]+",
    conda:
        "../envs/dfakd.yaml"
    threads: resources_for("evaluate")["threads"]
    resources:
        gpu=resources_for("evaluate")["gpu"],
        gpu_pool=LOCAL_GPUS,
        gpu_slots=LOCAL_GPU_SLOTS,
        mem_mb=resources_for("evaluate")["mem_mb"],
        runtime=resources_for("evaluate")["runtime"],
    params:
        job=decides(job_of_evaluate_teacher),
        run=run_only(job_of_evaluate_teacher),
    shell:
        "DFAKD_GPU_POOL={resources.gpu_pool} DFAKD_GPU_SLOTS={resources.gpu_slots} DFAKD_JOB_GPUS={resources.gpu} dfakd evaluate --config-json {params.job:q} --config-json {params.run:q} --checkpoint {input.checkpoint:q} -o {output:q} "
        "> {log:q} 2>&1"
