pmkv_unit_test(pmkv_test_serving
  SOURCES test_request_stream.cpp test_scheduler.cpp test_serving_engine.cpp
  LIBS pmkv_serving)
pmkv_unit_test(pmkv_test_server_config SOURCES test_server_config.cpp LIBS pmkv_server_config)
