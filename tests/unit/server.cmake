pmkv_unit_test(pmkv_test_server
  SOURCES test_chat_template.cpp test_openai_request.cpp test_completion_job.cpp
  LIBS pmkv_http nlohmann_json::nlohmann_json)
