"""`codeshard` commands that operate the service rather than the data: doctor, dev s3, serve, deploy."""
from __future__ import annotations

import os

from flows.cli_common import overrides


def cmd_doctor(args) -> int:
    from infra import doctor
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    print("codeshard settings (secrets masked):")
    for k, v in cfg.masked().items():
        print(f"  {k:24s} {v}")
    ok = True
    for check in doctor.checks(cfg):
        print(f"{check.name + ':':9s} {'ok' if check.ok else 'FAILED:'} {check.detail}")
        ok &= check.ok or not check.required
    return 0 if ok else 1


def cmd_dev_s3(args) -> int:
    from infra.seaweed import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, start_seaweed, stop_seaweed
    from infra.settings import Settings

    data_dir = os.path.join(Settings.load().dev_dir, "seaweedfs")
    if args.action == "up":
        srv = start_seaweed(data_dir, bucket=args.bucket, s3_port=args.port)
        print(f"SeaweedFS S3 on {srv.endpoint} (pid {srv.pid}, data {data_dir}); to use it:")
        print(f"  export CODESHARD_STORE=s3://{args.bucket}/codeshard CODESHARD_S3_ENDPOINT={srv.endpoint}")
        print(f"  export AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY} AWS_SECRET_ACCESS_KEY=<dev secret, see infra/seaweed.py>")
        if args.env_file:
            with open(args.env_file, "w") as f:
                f.write(f"export CODESHARD_STORE=s3://{args.bucket}/codeshard\n"
                        f"export CODESHARD_S3_ENDPOINT={srv.endpoint}\n"
                        f"export AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY}\n"
                        f"export AWS_SECRET_ACCESS_KEY={DEFAULT_SECRET_KEY}\n")
        return 0
    print("stopped" if stop_seaweed(data_dir) else "no SeaweedFS running for " + data_dir)
    return 0


def cmd_serve(args) -> int:
    from flows.deployments import serve_all
    from flows.limits import ensure_heavy_limit
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    ensure_heavy_limit(cfg.heavy_limit)
    serve_all(cfg)
    return 0


def cmd_deploy(args) -> int:
    from flows.deployments import deploy_all
    from flows.limits import ensure_heavy_limit
    from infra.settings import Settings

    cfg = Settings.load(**overrides(args))
    ensure_heavy_limit(cfg.heavy_limit)
    print(deploy_all(cfg, args.pool))
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0
