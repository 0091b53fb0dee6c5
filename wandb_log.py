"""Weights & Biases for vqvae's training loop: optional, and never in the way of training. Without
wandb installed, or with --no_wandb, a stand-in takes the calls; without a login or a network it logs
offline (upload later with `wandb sync`); an error inside wandb turns logging off instead of ending
the run. vqvae.train calls start_wandb; none of this is research logic.
"""
import dataclasses
import os
import socket


class NoWandb:
    """Stands in for a W&B run when W&B is off or unavailable."""

    def log(self, *args, **kwargs):
        pass

    def log_media(self, *args, **kwargs):
        pass

    def finish(self):
        pass


class SafeWandb:
    """Wraps a W&B run so an error inside wandb turns logging off instead of ending training."""

    def __init__(self, run):
        self.run = run

    def log(self, *args, **kwargs):
        if self.run is not None:
            try:
                self.run.log(*args, **kwargs)
            except Exception as e:
                print(f"W&B: logging failed ({type(e).__name__}: {e}); continuing without W&B")
                self.run = None

    def log_media(self, step: int, grid, counts) -> None:
        """grid: the reconstruction grid (H, W, 3) uint8; counts (K,): the validation code histogram."""
        if self.run is not None:
            try:
                import wandb

                media = {"val/reconstructions": wandb.Image(grid, caption="top: originals, bottom: hard-code reconstructions"),
                         "val/code_usage": wandb.Histogram(counts.numpy().astype("float64"))}
            except Exception as e:
                print(f"W&B: could not make the image and histogram ({type(e).__name__}: {e}); continuing without W&B")
                self.run = None
                return
            self.log(media, step=step)

    def finish(self):
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None



def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return any("wandb" in host for host in netrc.netrc().hosts)
    except (OSError, netrc.NetrcParseError):
        return False


WANDB_INIT_TIMEOUT_S = 20  # a server that answers but does not start the run: offline after this


def _wandb_server_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within `timeout` seconds, so a machine
    without network goes offline at once instead of waiting for wandb's own timeouts."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def start_wandb(cfg, run_dir, resume: bool, run_id: str):
    """A W&B run, or a stand-in. Never blocks or fails training: without a login it logs offline
    (sync later with `wandb sync`), and if W&B cannot start at all it is turned off. run_id is kept
    in the checkpoints, so a resumed run continues the same W&B run."""
    if not cfg.wandb:
        return NoWandb()
    try:
        import wandb
    except ImportError:
        print("W&B: wandb is not installed; logging locally only (pip install wandb, or --no_wandb)")
        return NoWandb()
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        print(f"W&B: not logged in; logging offline to {run_dir / 'wandb'} (upload later with `wandb sync`)")
    if mode == "online" and not _wandb_server_reachable():
        print(f"W&B: server not reachable; logging offline to {run_dir / 'wandb'} (upload later with `wandb sync`)")
        mode = "offline"
    for attempt in (mode, "offline"):
        try:
            run = wandb.init(project=cfg.wandb_project, name=cfg.name, group=cfg.wandb_group or None,
                             dir=str(run_dir), mode=attempt,
                             config=dataclasses.asdict(cfg), resume="allow" if resume else None,
                             id=run_id, settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))
            if attempt != mode:
                print(f"W&B: could not start {mode}; logging offline instead")
            return SafeWandb(run)
        except Exception as e:
            error = e
    print(f"W&B: could not start ({type(error).__name__}: {error}); logging locally only")
    return NoWandb()


