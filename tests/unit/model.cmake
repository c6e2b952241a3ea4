# engine/model: config.json parsing, RoPE frequencies, safetensors parsing, WeightStore.
pmkv_unit_test(pmkv_test_model
  SOURCES test_model_config.cpp test_safetensors.cpp test_weight_store.cpp
  LIBS pmkv_model nlohmann_json::nlohmann_json)
