pmkv_unit_test(pmkv_test_engine
  SOURCES test_kv_codec.cpp test_page_pool.cpp test_kv_cache_manager.cpp test_paged_attention.cpp test_kv_page_ops.cpp
          test_step_builder.cpp
  LIBS pmkv_engine)
pmkv_unit_test(pmkv_test_backend
  SOURCES test_backend_factory.cpp test_penalty_history.cpp
  LIBS pmkv_engine)
pmkv_unit_test(pmkv_test_golden
  SOURCES test_golden.cpp
  LIBS pmkv_engine nlohmann_json::nlohmann_json)
pmkv_unit_test(pmkv_test_calibrate
  SOURCES test_calibrate.cpp
  LIBS pmkv_engine nlohmann_json::nlohmann_json)
