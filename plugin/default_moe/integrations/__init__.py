"""Adapters to training engines. They translate: engine config -> MoEConfig, engine process
groups -> ParallelGroups, engine hooks -> calls of the core layer. No MoE logic lives here."""
