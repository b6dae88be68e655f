# Data preparation runs on the submitting host: cluster compute nodes often have no internet.
localrules:
    prepare_data,


rule prepare_data:
    output:
        touch(f"{OUT}/data/{{dataset}}.ready"),
    log:
        f"{OUT}/logs/prepare_data/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/prepare_data/{{dataset}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        name=lambda w: config["datasets"][w.dataset]["name"],
        root=lambda w: config["datasets"][w.dataset]["root"],
        # run-only, like the param `run` of the training rules (common.smk): computed from threads, it is a
        # derived param, which Snakemake's params trigger does not compare, so dropping `download` once the
        # data is there reruns nothing (a rerun here would rerun every job that reads the data)
        download=lambda w, threads: (
            "--download" if config["datasets"][w.dataset].get("download") else ""
        ),
    shell:
        "dfakd prepare-data {params.name} --root {params.root:q} {params.download} > {log:q} 2>&1"
