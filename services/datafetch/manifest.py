"""What ``frugalmesh data fetch`` downloads: every file of the data directory with the repository,
commit and path it comes from, its size and its sha256 (the contract: other bytes are never accepted).
See :mod:`services.datafetch.fetch` for the sources and how they are fetched."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Source:
    owner: str
    repo: str
    commit: str  # full 40-hex commit id used in URLs
    pinned: str  # the id the data README names (may be short)
    licence: str
    cite: str

    @property
    def slug(self) -> str:
        return f"{self.owner}/{self.repo}"


ROUTELLM = Source(
    "lm-sys", "RouteLLM", "0b64fdafe049e596a3f5657c219329f24af24198", "0b64fdaf",
    "Apache-2.0", 'Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data", ICLR 2025',
)
AZURE = Source(
    "Azure", "AzurePublicDataset", "790921015d50dd6aae7f7e47f39ba0e235ad6b08", "b469a113",
    "CC-BY-4.0", 'Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024',
)
MOONCAKE_CONV = Source(
    "kvcache-ai", "Mooncake", "a2a4b18ac537fd798d50e6e9f57031ce86419a37", "3b5a5941",
    "Apache-2.0", 'Qin et al., "Mooncake: A KVCache-centric Disaggregated Architecture for LLM Serving", FAST 2025',
)
MOONCAKE_SYN = Source(
    "kvcache-ai", "Mooncake", "3cca71daccf2a7afb8fe3f0295358f70e3a69fdb", "3b5a5941",
    MOONCAKE_CONV.licence, MOONCAKE_CONV.cite,
)


@dataclass(frozen=True)
class Entry:
    """One file: where it goes (``path``, relative to the data dir) and where it comes from."""

    path: str
    source: Source
    source_path: str
    size: int
    sha256: str

    @property
    def pinned(self) -> str:
        return self.source.pinned

    def url(self, base: str = DEFAULT_BASE) -> str:
        return f"{base.rstrip('/')}/{mirror_path(self)}"


def mirror_path(entry: Entry) -> str:
    """The path of ``entry`` under a mirror base: ``<owner>/<repo>/<commit>/<source path>``."""
    s = entry.source
    return f"{s.owner}/{s.repo}/{s.commit}/{entry.source_path}"


_MMLU = "routellm/evals/mmlu/responses/"
_R = ROUTELLM

MANIFEST: tuple[Entry, ...] = (
    Entry(
        "routing/LICENSE-Apache-2.0", _R, "LICENSE",
        11356, "43070e2d4e532684de521b885f385d0841030efa2b1a20bafb76133a5e1379c1",
    ),
    Entry(
        "routing/gsm8k_contaminated_prompts.jsonl", _R, "routellm/evals/gsm8k/contaminated_prompts.jsonl",
        6282, "1f5a7be02148ee0f7f306d233ba76a6573c826cee9499a34f8ef938a1a84c234",
    ),
    Entry(
        "routing/gsm8k_responses.csv", _R, "routellm/evals/gsm8k/gsm8k_responses.csv",
        1291062, "1f38ed03db354a020f71e92022383dc3cf37bbf2694dea4daaeea7b6c43fe57b",
    ),
    Entry(
        "routing/mmlu/contaminated_prompts.jsonl", _R, "routellm/evals/mmlu/contaminated_prompts.jsonl",
        4498, "9606c968198eabf5efa46ccba31286392c8e35525d83c86661618ffc5ec6d40e",
    ),
    Entry(
        "routing/mmlu/mmlu_anatomy.csv", _R, _MMLU + "mmlu_anatomy.csv",
        33922, "53ebea8257805eeecc25713728264b8235cffad7b720962a3eafc92fd27ef537",
    ),
    Entry(
        "routing/mmlu/mmlu_business_ethics.csv", _R, _MMLU + "mmlu_business_ethics.csv",
        33854, "13a45bed754ffe8f0e7f0348e69085c648a1ae0e91aa76cd5e6906fa45f7ec8e",
    ),
    Entry(
        "routing/mmlu/mmlu_clinical_knowledge.csv", _R, _MMLU + "mmlu_clinical_knowledge.csv",
        64226, "5ea37709bfbad4df7a3fcbd8973413f7645a2adfef9772490f09d3f293ffe882",
    ),
    Entry(
        "routing/mmlu/mmlu_college_biology.csv", _R, _MMLU + "mmlu_college_biology.csv",
        49612, "c38620db5b9f6f1b0fde7bc8d8299b8e2305c4dacbb1567c904cd51618d627d5",
    ),
    Entry(
        "routing/mmlu/mmlu_college_chemistry.csv", _R, _MMLU + "mmlu_college_chemistry.csv",
        25362, "78ca6ba22ff25c8fdb93e1c6e84384e72522106c73ed5ee9fed620928ce395ce",
    ),
    Entry(
        "routing/mmlu/mmlu_college_computer_science.csv", _R, _MMLU + "mmlu_college_computer_science.csv",
        43299, "8a7b2a87a36b428c9d1a8f12ce3b01cf7920f0a7146d6f8a111da6749c332da3",
    ),
    Entry(
        "routing/mmlu/mmlu_college_medicine.csv", _R, _MMLU + "mmlu_college_medicine.csv",
        83407, "63d71d29e630fc6538e1705a51f4267bdbbdea0fa7ee85056ad7d6f8f10d3987",
    ),
    Entry(
        "routing/mmlu/mmlu_conceptual_physics.csv", _R, _MMLU + "mmlu_conceptual_physics.csv",
        42034, "ea40473704b64cb60d564ffe91962848ec6fc3106b40089d08cebc98d5c7226d",
    ),
    Entry(
        "routing/mmlu/mmlu_econometrics.csv", _R, _MMLU + "mmlu_econometrics.csv",
        47278, "927b4d877cec8697f3b8378bb7e7c7a279babaea2edacf350ea50908701907b9",
    ),
    Entry(
        "routing/mmlu/mmlu_elementary_mathematics.csv", _R, _MMLU + "mmlu_elementary_mathematics.csv",
        72419, "88697ff0d238b5852c7a959379dc8b0b45c3554ed4b2ee7cbb7ffc34e06c7cf5",
    ),
    Entry(
        "routing/mmlu/mmlu_global_facts.csv", _R, _MMLU + "mmlu_global_facts.csv",
        19055, "6f75ddf7d6eb94ac0471529a85ff7f8b738c9f4055185b3114eed26393222d06",
    ),
    Entry(
        "routing/mmlu/mmlu_high_school_computer_science.csv", _R, _MMLU + "mmlu_high_school_computer_science.csv",
        45133, "d156d9448a6e899f7f976a0afac148a928bf709a2baa573f0c407854a25bdb11",
    ),
    Entry(
        "routing/mmlu/mmlu_high_school_geography.csv", _R, _MMLU + "mmlu_high_school_geography.csv",
        43125, "21b12044be4a6b9813880ad46372006dc0846e7f85fa46883bb73dbd90fba30a",
    ),
    Entry(
        "routing/mmlu/mmlu_high_school_microeconomics.csv", _R, _MMLU + "mmlu_high_school_microeconomics.csv",
        77019, "f7ea151efb4c9d96374db3358ac7e97e4d8349e26715f61dac98bc9d854ca046",
    ),
    Entry(
        "routing/mmlu/mmlu_high_school_us_history.csv", _R, _MMLU + "mmlu_high_school_us_history.csv",
        298464, "a71186d143363e203b2f216d78c9d21f10cca51de455ef176c9c01b77f546592",
    ),
    Entry(
        "routing/mmlu/mmlu_high_school_world_history.csv", _R, _MMLU + "mmlu_high_school_world_history.csv",
        380424, "e9c52305977dc37b3e48eee727ad933b2d24d96ca3a06aec865a8900b1e87d2c",
    ),
    Entry(
        "routing/mmlu/mmlu_human_aging.csv", _R, _MMLU + "mmlu_human_aging.csv",
        47361, "0d6c4109b4f61f138781ce50bbc60ff2e90dd451694d3926a088be5a5bd88aa8",
    ),
    Entry(
        "routing/mmlu/mmlu_human_sexuality.csv", _R, _MMLU + "mmlu_human_sexuality.csv",
        32866, "20916037e3012731883f926738daf47ed994f74ba25518fdb7f0df72a81143fd",
    ),
    Entry(
        "routing/mmlu/mmlu_international_law.csv", _R, _MMLU + "mmlu_international_law.csv",
        54224, "e389b886e3e1570bfdf798f6f56dc3c675350200c5baf0f41a0766294ff312eb",
    ),
    Entry(
        "routing/mmlu/mmlu_jurisprudence.csv", _R, _MMLU + "mmlu_jurisprudence.csv",
        34614, "7e94c3849231be7b2654db11e44ee51531f8474e300fe83b1e05438df3038f0b",
    ),
    Entry(
        "routing/mmlu/mmlu_management.csv", _R, _MMLU + "mmlu_management.csv",
        20594, "a00b12ab0265918f9335a85ce02303ddaea0491a7b099f88a05986eeac4aa4fb",
    ),
    Entry(
        "routing/mmlu/mmlu_marketing.csv", _R, _MMLU + "mmlu_marketing.csv",
        64281, "3ee0b6560ebe0eb4f14ce63227d6f6ec8cb8b6e57e345eae9460be742672f36c",
    ),
    Entry(
        "routing/mmlu/mmlu_medical_genetics.csv", _R, _MMLU + "mmlu_medical_genetics.csv",
        21444, "7c830f87dcbc0029137b3400cf361931831cb57dda55717a64e72ad74663d5df",
    ),
    Entry(
        "routing/mmlu/mmlu_miscellaneous.csv", _R, _MMLU + "mmlu_miscellaneous.csv",
        151860, "c2e1a5b0394a8429f55b6340e1865166ac17ec6b3571523005e413b3b2843b9f",
    ),
    Entry(
        "routing/mmlu/mmlu_moral_disputes.csv", _R, _MMLU + "mmlu_moral_disputes.csv",
        109870, "8b2b973b1987b724f39fd10970604d7f1150747a0db9ce766c193bd978c9d0c4",
    ),
    Entry(
        "routing/mmlu/mmlu_moral_scenarios.csv", _R, _MMLU + "mmlu_moral_scenarios.csv",
        379235, "78ded6fdca1cd0d5c4ed16a5ed4aebf2e98401b9c00b20e565e6cce5bf1153c7",
    ),
    Entry(
        "routing/mmlu/mmlu_nutrition.csv", _R, _MMLU + "mmlu_nutrition.csv",
        94113, "ba197fbf4b6c5034414d66ea7747211056cf5f709f83d919d2d856245720cc51",
    ),
    Entry(
        "routing/mmlu/mmlu_prehistory.csv", _R, _MMLU + "mmlu_prehistory.csv",
        91362, "afc816d4b78814627bae9b8c3730a9bb72bd958ff6259fd36c981777cfe83753",
    ),
    Entry(
        "routing/mmlu/mmlu_professional_medicine.csv", _R, _MMLU + "mmlu_professional_medicine.csv",
        219104, "6fda30b523e4e2ce8b1f18e871a0722190a4ac81ec377a75fbba4a63e0b510f7",
    ),
    Entry(
        "routing/mmlu/mmlu_professional_psychology.csv", _R, _MMLU + "mmlu_professional_psychology.csv",
        229411, "bfb3a7fb653e2b195d3fa258894af64d3f1c3dbd4059c1e0feb728131d20f9b3",
    ),
    Entry(
        "routing/mmlu/mmlu_sociology.csv", _R, _MMLU + "mmlu_sociology.csv",
        67343, "903ba6259b13f2877607abef22b7b19cb575104268d4ced615e3129d3caafb47",
    ),
    Entry(
        "routing/mmlu/mmlu_us_foreign_policy.csv", _R, _MMLU + "mmlu_us_foreign_policy.csv",
        29024, "f1c1d266753a3f161e2018c16c6948fb78c7f5e506a10b4fc0441049962a6c69",
    ),
    Entry(
        "routing/mmlu/mmlu_virology.csv", _R, _MMLU + "mmlu_virology.csv",
        39794, "d525f1ba88982befd42140e73822fe940e73db82bbdcdd569d95f26c3dd41e68",
    ),
    Entry(
        "routing/mmlu/mmlu_world_religions.csv", _R, _MMLU + "mmlu_world_religions.csv",
        26268, "49dc00d44e069ecaac6a7f7e2188f4a8bce5df56ee91bb15f55519d07f64af8e",
    ),
    Entry(
        "traces/LICENSE-Apache-2.0-mooncake", MOONCAKE_CONV, "LICENSE",
        11357, "58d1e17ffe5109a7ae296caafcadfdbe6a7d176f0bc4ab01e12a689b0499d8bd",
    ),
    Entry(
        "traces/LICENSE-CC-BY-4.0-azure", AZURE, "LICENSE",
        18653, "9bbc1ea9fe5c96df01b311a2ac864d5b18fc87b9948bfd14770e4b44db755ee9",
    ),
    Entry(
        "traces/azure_llm_2023_code.csv", AZURE, "data/AzureLLMInferenceTrace_code.csv",
        320117, "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
    ),
    Entry(
        "traces/azure_llm_2023_conv.csv", AZURE, "data/AzureLLMInferenceTrace_conv.csv",
        719188, "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    ),
    Entry(
        "traces/mooncake_conversation_trace.jsonl", MOONCAKE_CONV, "FAST25-release/traces/conversation_trace.jsonl",
        3029533, "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df",
    ),
    Entry(
        "traces/mooncake_synthetic_trace.jsonl", MOONCAKE_SYN, "FAST25-release/traces/synthetic_trace.jsonl",
        1136313, "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131",
    ),
)
