{
  description = "anyclaude: the Anthropic Messages API from local MLX models, for Claude Code";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "aarch64-darwin" "x86_64-linux" ];
      forEachSystem = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # uv installs the Python packages from uv.lock; Nix provides only Python and uv,
      # and uv must not download a Python of its own.
      uvEnv = pkgs: {
        UV_PYTHON = "${pkgs.python311}/bin/python3.11";
        UV_PYTHON_DOWNLOADS = "never";
      };
    in
    {
      devShells = forEachSystem (pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.python311 pkgs.uv ];
          env = uvEnv pkgs;
        };
      });

      apps = forEachSystem (pkgs:
        let
          serve = pkgs.writeShellApplication {
            name = "anyclaude-serve";
            runtimeInputs = [ pkgs.python311 pkgs.uv pkgs.gnugrep ];
            runtimeEnv = uvEnv pkgs;
            text = ''
              # In a checkout, run it (with your edits); elsewhere, the flake's own copy, whose
              # read-only store path cannot hold a virtualenv, so the venv goes to the cache.
              if [ -f pyproject.toml ] && grep -q '^name = "anyclaude"' pyproject.toml; then
                exec uv run anyclaude serve "$@"
              fi
              export UV_PROJECT_ENVIRONMENT="''${XDG_CACHE_HOME:-$HOME/.cache}/anyclaude/venv"
              exec uv run --frozen --project ${self} anyclaude serve "$@"
            '';
          };
        in
        {
          default = {
            type = "app";
            program = "${serve}/bin/anyclaude-serve";
          };
        });
    };
}
