"""The peers' side of `make bench-peers` (serving/peers.py): code that runs inside the peer servers,
from the benchmark-only venv .venv-peers (requirements-peers.txt), never in the serving image.

    stock_handler   TorchServe's stock ImageClassifier, changed only to take 28x28 grayscale images
    litserve_app    the same model behind LitServe
                    (`.venv-peers/bin/python serving/peer_apps/litserve_app.py -h`)
"""
